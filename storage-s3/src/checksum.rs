//! End-to-end checksums: CRC32C and length of an object's bytes.

use std::fmt;
use std::str::FromStr;

/// The name of the user-metadata entry holding an object's [`Checksum`] on stores that keep user
/// metadata (S3 sends it as the `x-amz-meta-flowstate-crc32c` header).
pub const CHECKSUM_METADATA_KEY: &str = "flowstate-crc32c";

/// CRC32C and length of an object's complete contents.
///
/// Uploads compute it over exactly the bytes handed to the store and return it; downloads compute
/// it over exactly the bytes received and compare. The checkpoint layer records it next to the
/// object's path so any later read can be verified end to end.
///
/// Its text form (`Display`/`FromStr`) is `crc32c:<8 hex digits>:<length>`, e.g.
/// `crc32c:e3069283:9`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Checksum {
    /// CRC32C (Castagnoli) of the contents.
    pub crc32c: u32,
    /// Length of the contents in bytes.
    pub len: u64,
}

impl Checksum {
    /// The checksum of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self {
            crc32c: crc32c::crc32c(data),
            len: data.len() as u64,
        }
    }

    /// The checksum of `self`'s contents followed by `data`.
    #[must_use]
    pub fn append(self, data: &[u8]) -> Self {
        Self {
            crc32c: crc32c::crc32c_append(self.crc32c, data),
            len: self.len + data.len() as u64,
        }
    }

    /// The checksum of empty contents.
    pub const EMPTY: Checksum = Checksum { crc32c: 0, len: 0 };

    /// The CRC as stored in user metadata: 8 lowercase hex digits.
    pub(crate) fn crc_hex(&self) -> String {
        format!("{:08x}", self.crc32c)
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "crc32c:{:08x}:{}", self.crc32c, self.len)
    }
}

/// The error of parsing a [`Checksum`] from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid checksum {0:?}: expected `crc32c:<8 hex digits>:<length>`")]
pub struct ParseChecksumError(String);

impl FromStr for Checksum {
    type Err = ParseChecksumError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseChecksumError(s.to_owned());
        let rest = s.strip_prefix("crc32c:").ok_or_else(err)?;
        let (crc, len) = rest.split_once(':').ok_or_else(err)?;
        if crc.len() != 8 {
            return Err(err());
        }
        Ok(Self {
            crc32c: u32::from_str_radix(crc, 16).map_err(|_| err())?,
            len: len.parse().map_err(|_| err())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_value_and_append() {
        // The standard CRC32C check value.
        let c = Checksum::of(b"123456789");
        assert_eq!(c.crc32c, 0xe306_9283);
        assert_eq!(c.len, 9);
        assert_eq!(Checksum::EMPTY.append(b"1234").append(b"56789"), c);
    }

    #[test]
    fn text_round_trip() {
        let c = Checksum::of(b"123456789");
        assert_eq!(c.to_string(), "crc32c:e3069283:9");
        assert_eq!("crc32c:e3069283:9".parse::<Checksum>(), Ok(c));
        for bad in [
            "",
            "crc32c:e306928:9",
            "crc32c:e3069283",
            "md5:e3069283:9",
            "crc32c:zz069283:9",
        ] {
            assert!(bad.parse::<Checksum>().is_err(), "{bad}");
        }
    }
}
