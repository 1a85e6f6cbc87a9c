//! Label selectors: which hosts a rollout or a `serin hosts -l …` query is about.
//!
//! The syntax follows Kubernetes' set-based selectors, reduced to what a fleet needs. A selector is
//! a comma-separated list of requirements, all of which must hold:
//!
//! | requirement        | holds when                                  |
//! |--------------------|---------------------------------------------|
//! | `key=value`        | the label is present with that value (`==` also accepted) |
//! | `key!=value`       | the label is absent or has another value    |
//! | `key`              | the label is present (any value)            |
//! | `!key`             | the label is absent                         |
//! | `key in (a,b)`     | the label is present with one of the values |
//! | `key notin (a,b)`  | the label is absent or has none of the values |
//!
//! An empty selector selects every host. Keys and values follow the label rules of
//! [`serin_proto::validate_label`]; whitespace around tokens is ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

/// A selector could not be parsed; the message quotes the selector and names the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed selector {selector:?}: {problem}")]
pub struct SelectorError {
    /// The selector as given.
    pub selector: String,
    /// What is wrong with it.
    pub problem: String,
}

/// One condition on one label.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Requirement {
    /// `key=value`: present with this value.
    Equals { key: String, value: String },
    /// `key!=value`: absent, or present with another value.
    NotEquals { key: String, value: String },
    /// `key`: present with any value.
    Exists { key: String },
    /// `!key`: absent.
    NotExists { key: String },
    /// `key in (a,b)`: present with one of the values.
    In {
        key: String,
        values: BTreeSet<String>,
    },
    /// `key notin (a,b)`: absent, or present with none of the values.
    NotIn {
        key: String,
        values: BTreeSet<String>,
    },
}

impl Requirement {
    /// The label key this requirement is about.
    pub fn key(&self) -> &str {
        match self {
            Requirement::Equals { key, .. }
            | Requirement::NotEquals { key, .. }
            | Requirement::Exists { key }
            | Requirement::NotExists { key }
            | Requirement::In { key, .. }
            | Requirement::NotIn { key, .. } => key,
        }
    }

    /// Whether a host with these labels satisfies the requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let got = labels.get(self.key());
        match self {
            Requirement::Equals { value, .. } => got == Some(value),
            Requirement::NotEquals { value, .. } => got != Some(value),
            Requirement::Exists { .. } => got.is_some(),
            Requirement::NotExists { .. } => got.is_none(),
            Requirement::In { values, .. } => got.is_some_and(|v| values.contains(v)),
            Requirement::NotIn { values, .. } => !got.is_some_and(|v| values.contains(v)),
        }
    }
}

fn write_set(f: &mut fmt::Formatter<'_>, values: &BTreeSet<String>) -> fmt::Result {
    f.write_str("(")?;
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            f.write_str(",")?;
        }
        f.write_str(v)?;
    }
    f.write_str(")")
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Requirement::Equals { key, value } => write!(f, "{key}={value}"),
            Requirement::NotEquals { key, value } => write!(f, "{key}!={value}"),
            Requirement::Exists { key } => f.write_str(key),
            Requirement::NotExists { key } => write!(f, "!{key}"),
            Requirement::In { key, values } => {
                write!(f, "{key} in ")?;
                write_set(f, values)
            }
            Requirement::NotIn { key, values } => {
                write!(f, "{key} notin ")?;
                write_set(f, values)
            }
        }
    }
}

/// A parsed label selector: every requirement must hold. The empty selector matches every host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// The selector that matches every host.
    pub fn everything() -> Self {
        Self::default()
    }

    /// Parses `role=web,zone=eu-1`, `zone!=eu-2`, `canary`, `!drained`, `zone in (eu-1,eu-2)`.
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let err = |problem: String| SelectorError {
            selector: input.to_string(),
            problem,
        };
        let mut requirements = Vec::new();
        for term in split_terms(input).map_err(err)? {
            requirements.push(parse_term(term).map_err(err)?);
        }
        Ok(Self { requirements })
    }

    /// The requirements, in the order they were written.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// True for the empty selector.
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether a host with these labels is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// Splits at top-level commas (not those inside `( … )`), trimming each term.
fn split_terms(input: &str) -> Result<Vec<&str>, String> {
    if input.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut terms = Vec::new();
    let mut depth = 0u32;
    let mut start = 0;
    for (i, c) in input.char_indices() {
        match c {
            '(' if depth > 0 => return Err("nested \"(\"".to_string()),
            '(' => depth += 1,
            ')' if depth == 0 => return Err("\")\" without a matching \"(\"".to_string()),
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(input[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth > 0 {
        return Err("\"(\" is never closed".to_string());
    }
    terms.push(input[start..].trim());
    if let Some(pos) = terms.iter().position(|t| t.is_empty()) {
        return Err(format!("empty requirement at position {}", pos + 1));
    }
    Ok(terms)
}

fn check_key(term: &str, key: &str) -> Result<String, String> {
    if key.is_empty() {
        return Err(format!("empty key in {term:?}"));
    }
    serin_proto::validate_label("selector", key, "")
        .map_err(|e| format!("in {term:?}: {}", e.problem))?;
    Ok(key.to_string())
}

fn check_value(term: &str, key: &str, value: &str) -> Result<String, String> {
    if value.is_empty() {
        return Err(format!(
            "empty value in {term:?} (use \"{key}\" to select hosts that have the label)"
        ));
    }
    serin_proto::validate_label("selector", key, value)
        .map_err(|e| format!("in {term:?}: {}", e.problem))?;
    Ok(value.to_string())
}

fn parse_set(term: &str, key: &str, rest: &str) -> Result<BTreeSet<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("expected a parenthesised list like \"(a,b)\" in {term:?}"))?;
    let mut values = BTreeSet::new();
    for v in inner.split(',') {
        values.insert(check_value(term, key, v.trim())?);
    }
    Ok(values)
}

/// Splits `key in (…)` / `key notin (…)` on the first whitespace-delimited operator word.
fn split_set_op<'a>(term: &'a str, op: &str) -> Option<(&'a str, &'a str)> {
    let mut search = 0;
    while let Some(pos) = term[search..].find(op) {
        let at = search + pos;
        let before = &term[..at];
        let after = &term[at + op.len()..];
        let before_ok = before.ends_with(char::is_whitespace);
        let after_ok = after.starts_with(char::is_whitespace) || after.starts_with('(');
        if before_ok && after_ok && !before.trim().is_empty() {
            return Some((before.trim(), after));
        }
        search = at + op.len();
    }
    None
}

fn parse_term(term: &str) -> Result<Requirement, String> {
    if term.contains('(') {
        if let Some((key, rest)) = split_set_op(term, "notin") {
            let key = check_key(term, key)?;
            let values = parse_set(term, &key, rest)?;
            return Ok(Requirement::NotIn { key, values });
        }
        if let Some((key, rest)) = split_set_op(term, "in") {
            let key = check_key(term, key)?;
            let values = parse_set(term, &key, rest)?;
            return Ok(Requirement::In { key, values });
        }
        return Err(format!(
            "{term:?} has a list but no \"in\" or \"notin\" operator"
        ));
    }
    if let Some((key, value)) = term.split_once("!=") {
        let key = check_key(term, key.trim())?;
        let value = check_value(term, &key, value.trim())?;
        return Ok(Requirement::NotEquals { key, value });
    }
    if let Some((key, value)) = term.split_once('=') {
        let value = value.strip_prefix('=').unwrap_or(value);
        let key = check_key(term, key.trim())?;
        let value = check_value(term, &key, value.trim())?;
        return Ok(Requirement::Equals { key, value });
    }
    if let Some(key) = term.strip_prefix('!') {
        let key = check_key(term, key.trim())?;
        return Ok(Requirement::NotExists { key });
    }
    if term.contains(char::is_whitespace) {
        return Err(format!(
            "{term:?} is not a requirement (expected key=value, key!=value, key, !key, key in (a,b))"
        ));
    }
    Ok(Requirement::Exists {
        key: check_key(term, term)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_selector_matches_every_host() {
        let s = Selector::parse("").unwrap();
        assert!(s.is_empty());
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("role", "web")])));
        assert!(Selector::parse("   ").unwrap().is_empty());
    }

    #[test]
    fn equality_requirements_must_all_hold() {
        let s = Selector::parse("role=web,zone=eu-1").unwrap();
        assert!(s.matches(&labels(&[("role", "web"), ("zone", "eu-1"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("role", "web"), ("zone", "eu-2")])));
        assert!(!s.matches(&labels(&[("role", "web")])));
        let s = Selector::parse(" role == web ").unwrap();
        assert!(s.matches(&labels(&[("role", "web")])));
    }

    #[test]
    fn inequality_and_existence() {
        let s = Selector::parse("zone!=eu-2").unwrap();
        assert!(s.matches(&labels(&[("zone", "eu-1")])));
        assert!(s.matches(&labels(&[])), "absent label satisfies !=");
        assert!(!s.matches(&labels(&[("zone", "eu-2")])));

        let s = Selector::parse("canary").unwrap();
        assert!(s.matches(&labels(&[("canary", "")])));
        assert!(!s.matches(&labels(&[("role", "web")])));

        let s = Selector::parse("!drained").unwrap();
        assert!(s.matches(&labels(&[("role", "web")])));
        assert!(!s.matches(&labels(&[("drained", "yes")])));
    }

    #[test]
    fn set_requirements() {
        let s = Selector::parse("zone in (eu-1, eu-2),role=web").unwrap();
        assert_eq!(s.requirements().len(), 2);
        assert!(s.matches(&labels(&[("zone", "eu-2"), ("role", "web")])));
        assert!(!s.matches(&labels(&[("zone", "us-1"), ("role", "web")])));
        assert!(!s.matches(&labels(&[("role", "web")])));

        let s = Selector::parse("zone notin (eu-1)").unwrap();
        assert!(s.matches(&labels(&[("zone", "us-1")])));
        assert!(s.matches(&labels(&[])));
        assert!(!s.matches(&labels(&[("zone", "eu-1")])));

        // A key that merely contains "in" is not an operator.
        let s = Selector::parse("inside in (a)").unwrap();
        assert_eq!(s.requirements()[0].key(), "inside");
    }

    #[test]
    fn display_round_trips() {
        for input in [
            "role=web,zone=eu-1",
            "zone!=eu-2",
            "canary,!drained",
            "zone in (eu-1,eu-2)",
            "zone notin (a,b),role=web",
        ] {
            let s = Selector::parse(input).unwrap();
            assert_eq!(s.to_string(), input);
            assert_eq!(Selector::parse(&s.to_string()).unwrap(), s);
        }
        assert_eq!(
            Selector::parse(" zone in ( eu-2 , eu-1 ) ")
                .unwrap()
                .to_string(),
            "zone in (eu-1,eu-2)"
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let e = Selector::parse("role=").unwrap_err();
        assert_eq!(e.selector, "role=");
        assert!(
            e.to_string()
                .starts_with("malformed selector \"role=\": empty value"),
            "{e}"
        );

        let e = Selector::parse("=web").unwrap_err();
        assert!(e.problem.contains("empty key"), "{e}");

        let e = Selector::parse("role=web,,zone=a").unwrap_err();
        assert!(e.problem.contains("empty requirement at position 2"), "{e}");

        let e = Selector::parse("zone in (a,b").unwrap_err();
        assert!(e.problem.contains("never closed"), "{e}");

        let e = Selector::parse("zone in (a,)").unwrap_err();
        assert!(e.problem.contains("empty value"), "{e}");

        let e = Selector::parse("role=we b").unwrap_err();
        assert!(e.problem.contains("role=\"we b\""), "{e}");

        let e = Selector::parse("ro le").unwrap_err();
        assert!(e.problem.contains("not a requirement"), "{e}");

        let e = Selector::parse("zone (a)").unwrap_err();
        assert!(e.problem.contains("no \"in\""), "{e}");
    }
}
