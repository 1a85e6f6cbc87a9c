//! Where the CLI finds its operator certificate, as kubectl and nomad users expect.
//!
//! Each of the three files is looked up in this order, the first source that names it wins:
//!
//! 1. flags: `--ca`, `--cert`, `--key`;
//! 2. environment: `SERIN_CA`, `SERIN_CERT`, `SERIN_KEY`;
//! 3. the per-user config file `$XDG_CONFIG_HOME/serin/config.toml` (else
//!    `~/.config/serin/config.toml`), table `[tls]` with keys `ca`, `cert`, `key`; relative paths
//!    are relative to the file's directory. The file may also name the `coordinator` URL.
//!
//! The certificate and its key are a pair: they must come from the same source, so a `SERIN_CERT`
//! in the environment never gets combined with a key from the config file. Nothing configured
//! anywhere is `Ok(None)`: no TLS (the caller decides whether plaintext is allowed). Half a
//! configuration is an error naming what is missing and where the rest came from.
//!
//! [`resolve`] is a pure function of its inputs (flags, an environment lookup, the config file's
//! contents), so every rule is tested without touching the real environment.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serin_security::tls::TlsFiles;

/// Environment variable naming the CA certificate.
pub const ENV_CA: &str = "SERIN_CA";
/// Environment variable naming the operator certificate.
pub const ENV_CERT: &str = "SERIN_CERT";
/// Environment variable naming the operator's private key.
pub const ENV_KEY: &str = "SERIN_KEY";

/// The TLS flags of the command line (each optional).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFlags {
    /// `--ca`
    pub ca: Option<PathBuf>,
    /// `--cert`
    pub cert: Option<PathBuf>,
    /// `--key`
    pub key: Option<PathBuf>,
}

/// Where a setting came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A command-line flag.
    Flag(&'static str),
    /// An environment variable.
    Env(&'static str),
    /// The per-user config file.
    File(PathBuf),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Flag(flag) => write!(f, "the {flag} flag"),
            Source::Env(var) => write!(f, "${var}"),
            Source::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The operator's TLS files and where each came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The three files.
    pub files: TlsFiles,
    /// Where the CA came from.
    pub ca_from: Source,
    /// Where the certificate and key came from.
    pub pair_from: Source,
}

/// The per-user config file, as read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserConfig {
    /// The file's path.
    pub path: PathBuf,
    /// `coordinator = "https://…"`: the URL to use when none is given on the command line or in
    /// `SERIN_COORDINATOR`.
    pub coordinator: Option<String>,
    /// `[tls] ca`
    pub ca: Option<PathBuf>,
    /// `[tls] cert`
    pub cert: Option<PathBuf>,
    /// `[tls] key`
    pub key: Option<PathBuf>,
    /// Unknown keys (warned about, not fatal).
    pub warnings: Vec<String>,
}

#[derive(Debug, Deserialize, Default)]
struct RawConfig {
    coordinator: Option<String>,
    #[serde(default)]
    tls: RawTls,
}

#[derive(Debug, Deserialize, Default)]
struct RawTls {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

/// Why the operator's TLS settings are unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    /// The config file does not parse.
    #[error("{}: {problem}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The certificate without its key, or the reverse.
    #[error("{present} is set by {from} but {missing} is not; give both from the same place")]
    HalfPair {
        /// What is set.
        present: &'static str,
        /// What is missing.
        missing: &'static str,
        /// Where the half came from.
        from: Source,
    },
    /// A certificate but no CA anywhere, or the reverse.
    #[error(
        "{present} is configured (by {from}) but no {missing} is (flag, environment or config file)"
    )]
    Incomplete {
        /// What is configured.
        present: &'static str,
        /// What is missing.
        missing: &'static str,
        /// Where the configured part came from.
        from: Source,
    },
}

/// The per-user config file's path: `$XDG_CONFIG_HOME/serin/config.toml`, else
/// `$HOME/.config/serin/config.toml`; `None` when neither variable is set.
pub fn user_config_path(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(xdg) = env("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(xdg).join("serin").join("config.toml"));
    }
    env("HOME").filter(|v| !v.is_empty()).map(|home| {
        PathBuf::from(home)
            .join(".config")
            .join("serin")
            .join("config.toml")
    })
}

/// Parses the per-user config file's `text`; relative paths are made relative to its directory.
pub fn parse_user_config(path: &Path, text: &str) -> Result<UserConfig, CredentialsError> {
    let mut warnings = Vec::new();
    let de = toml::Deserializer::parse(text).map_err(|e| CredentialsError::BadFile {
        path: path.to_path_buf(),
        problem: e.to_string(),
    })?;
    let raw: RawConfig = serde_ignored::deserialize(de, |key| {
        warnings.push(format!("{}: unknown key {key}", path.display()));
    })
    .map_err(|e: toml::de::Error| CredentialsError::BadFile {
        path: path.to_path_buf(),
        problem: e.to_string(),
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let abs = |p: Option<PathBuf>| p.map(|p| if p.is_relative() { base.join(p) } else { p });
    Ok(UserConfig {
        path: path.to_path_buf(),
        coordinator: raw.coordinator,
        ca: abs(raw.tls.ca),
        cert: abs(raw.tls.cert),
        key: abs(raw.tls.key),
        warnings,
    })
}

/// Reads the per-user config file, if there is one.
pub fn load_user_config(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<UserConfig>, CredentialsError> {
    let Some(path) = user_config_path(env) else {
        return Ok(None);
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => parse_user_config(&path, &text).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CredentialsError::BadFile {
            path,
            problem: e.to_string(),
        }),
    }
}

/// Resolves the operator's TLS files from the flags, the environment and the config file.
pub fn resolve(
    flags: &TlsFlags,
    env: &dyn Fn(&str) -> Option<String>,
    file: Option<&UserConfig>,
) -> Result<Option<Resolved>, CredentialsError> {
    let env_path = |var| env(var).filter(|v| !v.is_empty()).map(PathBuf::from);

    let ca = flags
        .ca
        .clone()
        .map(|p| (p, Source::Flag("--ca")))
        .or_else(|| env_path(ENV_CA).map(|p| (p, Source::Env(ENV_CA))))
        .or_else(|| file.and_then(|f| f.ca.clone().map(|p| (p, Source::File(f.path.clone())))));

    let sources = [
        (
            flags.cert.clone(),
            flags.key.clone(),
            Source::Flag("--cert"),
            Source::Flag("--key"),
        ),
        (
            env_path(ENV_CERT),
            env_path(ENV_KEY),
            Source::Env(ENV_CERT),
            Source::Env(ENV_KEY),
        ),
        (
            file.and_then(|f| f.cert.clone()),
            file.and_then(|f| f.key.clone()),
            Source::File(file.map(|f| f.path.clone()).unwrap_or_default()),
            Source::File(file.map(|f| f.path.clone()).unwrap_or_default()),
        ),
    ];
    let mut pair = None;
    for (cert, key, cert_from, key_from) in sources {
        match (cert, key) {
            (Some(cert), Some(key)) => {
                pair = Some((cert, key, cert_from));
                break;
            }
            (Some(_), None) => {
                return Err(CredentialsError::HalfPair {
                    present: "the certificate",
                    missing: "its key",
                    from: cert_from,
                });
            }
            (None, Some(_)) => {
                return Err(CredentialsError::HalfPair {
                    present: "the key",
                    missing: "its certificate",
                    from: key_from,
                });
            }
            (None, None) => {}
        }
    }
    match (ca, pair) {
        (None, None) => Ok(None),
        (Some((ca, ca_from)), Some((cert, key, pair_from))) => Ok(Some(Resolved {
            files: TlsFiles { ca, cert, key },
            ca_from,
            pair_from,
        })),
        (Some((_, from)), None) => Err(CredentialsError::Incomplete {
            present: "a CA",
            missing: "operator certificate and key",
            from,
        }),
        (None, Some((_, _, from))) => Err(CredentialsError::Incomplete {
            present: "an operator certificate",
            missing: "CA",
            from,
        }),
    }
}

/// The transport the CLI dials with: mutual TLS from the resolved files, or plaintext only when
/// nothing is configured and the caller explicitly allows it (a development flag). The error says
/// which file is wrong and where its path came from.
pub fn client_transport(
    resolved: Option<&Resolved>,
    allow_plaintext: bool,
) -> Result<serin_security::transport::ClientTransport, String> {
    use serin_security::transport::ClientTransport;
    let Some(r) = resolved else {
        return if allow_plaintext {
            Ok(ClientTransport::Plaintext)
        } else {
            Err(format!(
                "no operator certificate configured: give --ca, --cert and --key, set {ENV_CA}, \
                 {ENV_CERT} and {ENV_KEY}, or write them in ~/.config/serin/config.toml ([tls])"
            ))
        };
    };
    let material = serin_security::tls::TlsMaterial::load(&r.files).map_err(|e| {
        format!(
            "{e} (CA from {}, certificate and key from {})",
            r.ca_from, r.pair_from
        )
    })?;
    let config = serin_security::tls::operator_client_config(&material)
        .map_err(|e| format!("{e} (from {})", r.pair_from))?;
    Ok(ClientTransport::Tls {
        config,
        server_name: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn file() -> UserConfig {
        parse_user_config(
            Path::new("/home/alice/.config/serin/config.toml"),
            "coordinator = \"https://serin.example.com:7700\"\n[tls]\nca = \"ca.crt\"\ncert = \"alice.crt\"\nkey = \"/secure/alice.key\"\n",
        )
        .unwrap()
    }

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn the_config_file_is_found_under_xdg_then_home() {
        assert_eq!(
            user_config_path(&env(&[("XDG_CONFIG_HOME", "/x"), ("HOME", "/h")])),
            Some(p("/x/serin/config.toml"))
        );
        assert_eq!(
            user_config_path(&env(&[("HOME", "/h")])),
            Some(p("/h/.config/serin/config.toml"))
        );
        assert_eq!(user_config_path(&env(&[])), None);
    }

    #[test]
    fn the_config_file_resolves_relative_paths_and_warns_on_unknown_keys() {
        let f = file();
        assert_eq!(f.ca, Some(p("/home/alice/.config/serin/ca.crt")));
        assert_eq!(f.cert, Some(p("/home/alice/.config/serin/alice.crt")));
        assert_eq!(f.key, Some(p("/secure/alice.key")));
        assert_eq!(
            f.coordinator.as_deref(),
            Some("https://serin.example.com:7700")
        );
        assert!(f.warnings.is_empty());
        let f =
            parse_user_config(Path::new("/c.toml"), "[tls]\nca = \"a\"\nkee = \"b\"\n").unwrap();
        assert_eq!(f.warnings, vec!["/c.toml: unknown key tls.kee".to_string()]);
        let e = parse_user_config(Path::new("/c.toml"), "[tls\n").unwrap_err();
        assert!(e.to_string().starts_with("/c.toml: "), "{e}");
    }

    #[test]
    fn flags_beat_the_environment_which_beats_the_file() {
        let f = file();
        let all_env = env(&[
            (ENV_CA, "/env/ca"),
            (ENV_CERT, "/env/c"),
            (ENV_KEY, "/env/k"),
        ]);
        let flags = TlsFlags {
            ca: Some(p("/flag/ca")),
            cert: Some(p("/flag/c")),
            key: Some(p("/flag/k")),
        };
        let r = resolve(&flags, &all_env, Some(&f)).unwrap().unwrap();
        assert_eq!(r.files.ca, p("/flag/ca"));
        assert_eq!((r.files.cert, r.files.key), (p("/flag/c"), p("/flag/k")));
        assert_eq!(r.pair_from, Source::Flag("--cert"));

        let r = resolve(&TlsFlags::default(), &all_env, Some(&f))
            .unwrap()
            .unwrap();
        assert_eq!(r.files.ca, p("/env/ca"));
        assert_eq!(r.files.cert, p("/env/c"));
        assert_eq!(r.pair_from, Source::Env(ENV_CERT));

        let r = resolve(&TlsFlags::default(), &env(&[]), Some(&f))
            .unwrap()
            .unwrap();
        assert_eq!(r.files.cert, p("/home/alice/.config/serin/alice.crt"));
        assert_eq!(r.ca_from, Source::File(f.path.clone()));

        // Each part independently: the CA from a flag, the pair from the file.
        let only_ca = TlsFlags {
            ca: Some(p("/flag/ca")),
            ..TlsFlags::default()
        };
        let r = resolve(&only_ca, &env(&[]), Some(&f)).unwrap().unwrap();
        assert_eq!(r.files.ca, p("/flag/ca"));
        assert_eq!(r.files.key, p("/secure/alice.key"));
    }

    #[test]
    fn nothing_anywhere_is_no_tls_and_half_a_setup_is_an_error() {
        assert_eq!(
            resolve(&TlsFlags::default(), &env(&[]), None).unwrap(),
            None
        );

        let e = resolve(
            &TlsFlags::default(),
            &env(&[(ENV_CERT, "/c")]),
            Some(&file()),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the certificate is set by $SERIN_CERT but its key is not; give both from the same place"
        );
        let flags = TlsFlags {
            key: Some(p("/k")),
            ..TlsFlags::default()
        };
        let e = resolve(&flags, &env(&[]), None).unwrap_err();
        assert!(
            e.to_string().contains("the key is set by the --key flag"),
            "{e}"
        );

        let e = resolve(&TlsFlags::default(), &env(&[(ENV_CA, "/ca")]), None).unwrap_err();
        assert!(
            e.to_string().contains("no operator certificate and key"),
            "{e}"
        );
        let e = resolve(
            &TlsFlags::default(),
            &env(&[(ENV_CERT, "/c"), (ENV_KEY, "/k")]),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("no CA is"), "{e}");
    }

    #[test]
    fn resolved_files_become_a_tls_transport_and_nothing_needs_an_explicit_plaintext() {
        use serin_security::pki::{DevPki, Subject};
        use serin_security::transport::ClientTransport;
        use serin_security::{OperatorName, Role};
        let dir = tempfile::tempdir().unwrap();
        let alice = OperatorName::new("alice").unwrap();
        let host = serin_proto::HostId::new("h1").unwrap();
        let pki = DevPki::create(
            dir.path(),
            &Subject::Coordinator {
                dns_names: vec!["localhost".into()],
                ips: vec![],
            },
            std::slice::from_ref(&host),
            &[(alice.clone(), Role::Viewer)],
            std::time::SystemTime::now(),
        )
        .unwrap();
        let resolved = |files: serin_security::tls::TlsFiles| Resolved {
            files,
            ca_from: Source::Env(ENV_CA),
            pair_from: Source::Flag("--cert"),
        };
        let ok = client_transport(Some(&resolved(pki.operator(&alice))), false).unwrap();
        assert!(matches!(ok, ClientTransport::Tls { .. }));

        let e = client_transport(Some(&resolved(pki.agent(&host))), false).unwrap_err();
        assert!(
            e.contains("expected an operator identity") && e.contains("the --cert flag"),
            "{e}"
        );
        let mut missing = pki.operator(&alice);
        missing.key = dir.path().join("nope.key");
        let e = client_transport(Some(&resolved(missing)), false).unwrap_err();
        assert!(e.contains("nope.key") && e.contains("$SERIN_CA"), "{e}");

        assert!(
            client_transport(None, false)
                .unwrap_err()
                .contains("no operator certificate")
        );
        assert!(matches!(
            client_transport(None, true).unwrap(),
            ClientTransport::Plaintext
        ));
    }
}
