//! The protobuf codec of every serin service: tonic-prost's encoder and decoder with small
//! initial buffers.
//!
//! tonic gives every stream an 8 KiB encode buffer and an 8 KiB decode buffer up front. A
//! coordinator holds one long-lived `Attach` stream per agent whose messages are a few hundred
//! bytes at most (a heartbeat is a few bytes, an order or a health report one or two hundred),
//! so those two buffers were 16 KiB of the ~36 KiB each connected agent cost. They start at
//! 256 bytes (1 KiB before: another ~1.5 KiB per agent, seen in a heap profile of 1,500 idle
//! agents) and grow to the largest message a stream actually carries (an artifact chunk, a full
//! health report), so starting small costs a reallocation or two on the streams that carry large
//! messages and nothing on the others. Generated code uses it through `codec_path` in
//! `proto/build.rs`.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial capacity of a stream's encode and decode buffers.
pub const INITIAL_BUFFER: usize = 256;
/// Encoded bytes after which a streaming response yields to the runtime (tonic's default).
pub const YIELD_THRESHOLD: usize = 32 * 1024;

/// The buffer settings every serin stream starts with.
pub fn buffer_settings() -> BufferSettings {
    BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD)
}

/// A [`tonic_prost::ProstCodec`] whose buffers start at [`INITIAL_BUFFER`] bytes.
#[derive(Debug, Clone, Copy)]
pub struct SerinCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SerinCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SerinCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(buffer_settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(buffer_settings())
    }
}

#[cfg(test)]
mod tests {
    use tonic::codec::{Decoder, Encoder};

    use super::*;

    /// The generated clients and servers use this codec, and it starts small.
    #[test]
    fn streams_start_with_small_buffers() {
        let mut codec = SerinCodec::<crate::wire::Hello, crate::wire::Hello>::default();
        let small = format!("buffer_size: {INITIAL_BUFFER},");
        let encoder = format!("{:?}", codec.encoder().buffer_settings());
        let decoder = format!("{:?}", codec.decoder().buffer_settings());
        assert!(encoder.contains(&small), "{encoder}");
        assert!(decoder.contains(&small), "{decoder}");
        let generated = include_str!(concat!(env!("OUT_DIR"), "/serin.v1.rs"));
        assert!(
            generated.contains("crate::codec::SerinCodec::default()")
                && !generated.contains("ProstCodec::default()"),
            "the generated services do not use SerinCodec"
        );
    }
}
