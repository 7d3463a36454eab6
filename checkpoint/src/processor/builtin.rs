//! Decoding and encoding the bytes of the built-in serializers without knowing the Rust types:
//! what a tool needs to show any job's state (`flowstate state dump`) and to look up a key
//! typed on a command line (`flowstate state get --key`).
//!
//! The serializer snapshot says everything: `postcard` with a schema name written as a Rust
//! type (`u64`, `String`, `Vec<u8>`, `Option<i64>`, `(u64, String)`, ..., also the legacy type
//! names such as `alloc::string::String`), `fixed-width-be` with an integer type name, and
//! `raw-bytes`. Anything else (a user's own type, a custom serializer) is not decodable here:
//! [`decode`] answers `None` and the caller shows the bytes.
//!
//! ```
//! use checkpoint::processor::builtin::{decode, encode_text, Decoded};
//! use state_api::{PostcardSerializer, StateSerializer};
//!
//! let ser = PostcardSerializer::<(u64, String)>::new();
//! let mut bytes = Vec::new();
//! ser.serialize(&(7, "seven".to_string()), &mut bytes).unwrap();
//! let value = decode(&ser.snapshot(), &bytes).unwrap().unwrap();
//! assert_eq!(value, Decoded::Seq(vec![Decoded::UInt(7), Decoded::Str("seven".into())]));
//!
//! let key = PostcardSerializer::<String>::new().snapshot();
//! assert_eq!(encode_text(&key, "ann").unwrap().unwrap(), b"\x03ann");
//! ```

use state_api::{
    SerializerSnapshot, BYTES_SERIALIZER_ID, FIXED_WIDTH_SERIALIZER_ID, POSTCARD_SERIALIZER_ID,
};

/// A value decoded without its Rust type.
#[derive(Clone, Debug, PartialEq)]
pub enum Decoded {
    /// `()`.
    Unit,
    /// A `bool`.
    Bool(bool),
    /// A signed integer.
    Int(i128),
    /// An unsigned integer.
    UInt(u128),
    /// A float.
    Float(f64),
    /// A `char` or `String`.
    Str(String),
    /// Bytes (`Vec<u8>`, raw bytes).
    Bytes(Vec<u8>),
    /// `Option::None`.
    None,
    /// `Option::Some`.
    Some(Box<Decoded>),
    /// A tuple or a `Vec` (other than of `u8`).
    Seq(Vec<Decoded>),
}

impl std::fmt::Display for Decoded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decoded::Unit => f.write_str("()"),
            Decoded::Bool(b) => write!(f, "{b}"),
            Decoded::Int(i) => write!(f, "{i}"),
            Decoded::UInt(u) => write!(f, "{u}"),
            Decoded::Float(x) => write!(f, "{x}"),
            Decoded::Str(s) => write!(f, "{s:?}"),
            Decoded::Bytes(b) => write!(f, "0x{}", hex(b)),
            Decoded::None => f.write_str("None"),
            Decoded::Some(v) => write!(f, "Some({v})"),
            Decoded::Seq(items) => {
                f.write_str("(")?;
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str(")")
            }
        }
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A type a built-in serializer's schema names.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Ty {
    Unit,
    Bool,
    Char,
    Str,
    U(u32),
    I(u32),
    F32,
    F64,
    Vec(Box<Ty>),
    Option(Box<Ty>),
    Tuple(Vec<Ty>),
}

/// Parses a Rust type as the built-in schema names write it; `None` for anything else.
fn parse_type(schema: &str) -> Option<Ty> {
    let mut p = TypeParser {
        s: schema.as_bytes(),
        at: 0,
    };
    let t = p.ty(0)?;
    p.ws();
    (p.at == p.s.len()).then_some(t)
}

struct TypeParser<'a> {
    s: &'a [u8],
    at: usize,
}

impl TypeParser<'_> {
    fn ws(&mut self) {
        while self.s.get(self.at) == Some(&b' ') {
            self.at += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.at) == Some(&c) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn ident(&mut self) -> String {
        self.ws();
        let start = self.at;
        while self
            .s
            .get(self.at)
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b':')
        {
            self.at += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.at]).into_owned()
    }

    fn ty(&mut self, depth: u32) -> Option<Ty> {
        if depth > 16 {
            return None;
        }
        if self.eat(b'(') {
            let mut items = Vec::new();
            if self.eat(b')') {
                return Some(Ty::Unit);
            }
            loop {
                items.push(self.ty(depth + 1)?);
                if self.eat(b')') {
                    break;
                }
                if !self.eat(b',') {
                    return None;
                }
                if self.eat(b')') {
                    break;
                }
            }
            return Some(if items.len() == 1 {
                items.pop()?
            } else {
                Ty::Tuple(items)
            });
        }
        let name = self.ident();
        let name = name
            .strip_prefix("alloc::string::")
            .or_else(|| name.strip_prefix("alloc::vec::"))
            .or_else(|| name.strip_prefix("core::option::"))
            .or_else(|| name.strip_prefix("std::string::"))
            .or_else(|| name.strip_prefix("std::vec::"))
            .or_else(|| name.strip_prefix("std::option::"))
            .unwrap_or(&name);
        Some(match name {
            "bool" => Ty::Bool,
            "char" => Ty::Char,
            "String" => Ty::Str,
            "u8" => Ty::U(8),
            "u16" => Ty::U(16),
            "u32" => Ty::U(32),
            "u64" | "usize" => Ty::U(64),
            "u128" => Ty::U(128),
            "i8" => Ty::I(8),
            "i16" => Ty::I(16),
            "i32" => Ty::I(32),
            "i64" | "isize" => Ty::I(64),
            "i128" => Ty::I(128),
            "f32" => Ty::F32,
            "f64" => Ty::F64,
            "Vec" | "Option" => {
                if !self.eat(b'<') {
                    return None;
                }
                let inner = self.ty(depth + 1)?;
                if !self.eat(b'>') {
                    return None;
                }
                if name == "Vec" {
                    Ty::Vec(Box::new(inner))
                } else {
                    Ty::Option(Box::new(inner))
                }
            }
            _ => return None,
        })
    }
}

/// Decodes `bytes` written by the serializer `snapshot` describes: `None` when it is not a
/// built-in serializer of a type named in its schema, `Some(Err)` when the bytes do not fit
/// that type.
pub fn decode(snapshot: &SerializerSnapshot, bytes: &[u8]) -> Option<Result<Decoded, String>> {
    match snapshot.id.as_str() {
        BYTES_SERIALIZER_ID => Some(Ok(Decoded::Bytes(bytes.to_vec()))),
        FIXED_WIDTH_SERIALIZER_ID => {
            let ty = parse_type(std::str::from_utf8(&snapshot.schema).ok()?)?;
            Some(decode_fixed(&ty, bytes))
        }
        POSTCARD_SERIALIZER_ID => {
            let ty = parse_type(std::str::from_utf8(&snapshot.schema).ok()?)?;
            let mut r = Postcard { b: bytes, at: 0 };
            Some(r.value(&ty).and_then(|v| {
                if r.at == bytes.len() {
                    Ok(v)
                } else {
                    Err(format!(
                        "{} bytes left after a {}",
                        bytes.len() - r.at,
                        String::from_utf8_lossy(&snapshot.schema)
                    ))
                }
            }))
        }
        _ => None,
    }
}

fn decode_fixed(ty: &Ty, bytes: &[u8]) -> Result<Decoded, String> {
    let (width, signed) = match ty {
        Ty::U(w) => (*w as usize / 8, false),
        Ty::I(w) => (*w as usize / 8, true),
        _ => return Err("fixed-width values are integers".into()),
    };
    if bytes.len() != width {
        return Err(format!("expected {width} bytes, found {}", bytes.len()));
    }
    let mut be = [0u8; 16];
    be[16 - width..].copy_from_slice(bytes);
    let u = u128::from_be_bytes(be);
    Ok(if signed {
        // Sign-extend from `width` bytes.
        let shift = 128 - width * 8;
        Decoded::Int(((u << shift) as i128) >> shift)
    } else {
        Decoded::UInt(u)
    })
}

struct Postcard<'a> {
    b: &'a [u8],
    at: usize,
}

impl Postcard<'_> {
    fn byte(&mut self) -> Result<u8, String> {
        let b = *self
            .b
            .get(self.at)
            .ok_or_else(|| format!("truncated at byte {}", self.at))?;
        self.at += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or_else(|| format!("{n} bytes claimed at byte {}, fewer are there", self.at))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn varint(&mut self, bits: u32) -> Result<u128, String> {
        let mut v: u128 = 0;
        for i in 0..19u32 {
            let b = self.byte()?;
            let shift = 7 * i;
            if shift >= bits + 7 {
                return Err("varint too long".into());
            }
            v |= u128::from(b & 0x7f).checked_shl(shift).unwrap_or(0);
            if b & 0x80 == 0 {
                if bits < 128 && v >> bits != 0 {
                    return Err(format!("varint out of range for {bits} bits"));
                }
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    fn len(&mut self) -> Result<usize, String> {
        let n = self.varint(64)?;
        let n = usize::try_from(n).map_err(|_| "length too large".to_string())?;
        if n > self.b.len() - self.at {
            return Err(format!("length {n} at byte {} exceeds the value", self.at));
        }
        Ok(n)
    }

    fn value(&mut self, ty: &Ty) -> Result<Decoded, String> {
        Ok(match ty {
            Ty::Unit => Decoded::Unit,
            Ty::Bool => match self.byte()? {
                0 => Decoded::Bool(false),
                1 => Decoded::Bool(true),
                b => return Err(format!("{b} is not a bool")),
            },
            Ty::U(8) => Decoded::UInt(u128::from(self.byte()?)),
            Ty::I(8) => Decoded::Int(i128::from(self.byte()? as i8)),
            Ty::U(bits) => Decoded::UInt(self.varint(*bits)?),
            Ty::I(bits) => {
                let z = self.varint(*bits)?;
                Decoded::Int(((z >> 1) as i128) ^ -((z & 1) as i128))
            }
            Ty::F32 => {
                let b = self.take(4)?;
                Decoded::Float(f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            }
            Ty::F64 => {
                let b = self.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                Decoded::Float(f64::from_le_bytes(a))
            }
            Ty::Str | Ty::Char => {
                let n = self.len()?;
                let s = std::str::from_utf8(self.take(n)?)
                    .map_err(|e| format!("not UTF-8: {e}"))?
                    .to_string();
                Decoded::Str(s)
            }
            Ty::Vec(inner) if **inner == Ty::U(8) => {
                let n = self.len()?;
                Decoded::Bytes(self.take(n)?.to_vec())
            }
            Ty::Vec(inner) => {
                let n = self.len()?;
                let mut items = Vec::with_capacity(n.min(4096));
                for _ in 0..n {
                    items.push(self.value(inner)?);
                }
                Decoded::Seq(items)
            }
            Ty::Option(inner) => match self.byte()? {
                0 => Decoded::None,
                1 => Decoded::Some(Box::new(self.value(inner)?)),
                b => return Err(format!("{b} is not an Option tag")),
            },
            Ty::Tuple(items) => Decoded::Seq(
                items
                    .iter()
                    .map(|t| self.value(t))
                    .collect::<Result<_, _>>()?,
            ),
        })
    }
}

/// Encodes a value typed as text (`42`, `-7`, `ann`, `true`) with the serializer `snapshot`
/// describes, for scalar built-in types (integers, `String`, `char`, `bool`; raw bytes as
/// hex): `None` when the type is not one of those, `Some(Err)` when the text is not a value of
/// it.
pub fn encode_text(snapshot: &SerializerSnapshot, text: &str) -> Option<Result<Vec<u8>, String>> {
    let schema = std::str::from_utf8(&snapshot.schema).ok();
    match snapshot.id.as_str() {
        BYTES_SERIALIZER_ID => Some(unhex(text)),
        FIXED_WIDTH_SERIALIZER_ID => {
            let ty = parse_type(schema?)?;
            Some(encode_fixed(&ty, text))
        }
        POSTCARD_SERIALIZER_ID => {
            let ty = parse_type(schema?)?;
            let mut out = Vec::new();
            let bad = |what: &str| format!("'{text}' is not {what}");
            let r = match &ty {
                Ty::Str => {
                    put_varint(&mut out, text.len() as u128);
                    out.extend_from_slice(text.as_bytes());
                    Ok(())
                }
                Ty::Char if text.chars().count() == 1 => {
                    put_varint(&mut out, text.len() as u128);
                    out.extend_from_slice(text.as_bytes());
                    Ok(())
                }
                Ty::Bool => match text {
                    "true" | "false" => {
                        out.push(u8::from(text == "true"));
                        Ok(())
                    }
                    _ => Err(bad("a bool")),
                },
                Ty::U(bits) => match text.parse::<u128>() {
                    Ok(v) if *bits == 128 || v >> bits == 0 => {
                        if *bits == 8 {
                            out.push(v as u8);
                        } else {
                            put_varint(&mut out, v);
                        }
                        Ok(())
                    }
                    _ => Err(bad(&format!("a u{bits}"))),
                },
                Ty::I(bits) => match text.parse::<i128>() {
                    Ok(v) if *bits == 128 || (v >> (bits - 1) == 0 || v >> (bits - 1) == -1) => {
                        if *bits == 8 {
                            out.push(v as i8 as u8);
                        } else {
                            put_varint(&mut out, ((v << 1) ^ (v >> 127)) as u128);
                        }
                        Ok(())
                    }
                    _ => Err(bad(&format!("an i{bits}"))),
                },
                _ => return None,
            };
            Some(r.map(|()| out))
        }
        _ => None,
    }
}

fn encode_fixed(ty: &Ty, text: &str) -> Result<Vec<u8>, String> {
    let (width, signed) = match ty {
        Ty::U(w) => (*w as usize / 8, false),
        Ty::I(w) => (*w as usize / 8, true),
        _ => return Err("fixed-width values are integers".into()),
    };
    let bits = width * 8;
    let v: i128 = if signed {
        let v = text
            .parse::<i128>()
            .map_err(|_| format!("'{text}' is not an i{bits}"))?;
        if bits < 128 && !(v >> (bits - 1) == 0 || v >> (bits - 1) == -1) {
            return Err(format!("'{text}' is not an i{bits}"));
        }
        v
    } else {
        let v = text
            .parse::<u128>()
            .ok()
            .filter(|v| bits == 128 || v >> bits == 0)
            .ok_or_else(|| format!("'{text}' is not a u{bits}"))?;
        v as i128
    };
    Ok(v.to_be_bytes()[16 - width..].to_vec())
}

fn put_varint(out: &mut Vec<u8>, mut v: u128) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Bytes from hex (an optional `0x` first).
pub fn unhex(text: &str) -> Result<Vec<u8>, String> {
    let t = text.strip_prefix("0x").unwrap_or(text);
    if !t.len().is_multiple_of(2) || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("'{text}' is not hex"));
    }
    (0..t.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&t[i..i + 2], 16).map_err(|e| e.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use state_api::{BytesSerializer, FixedWidthSerializer, PostcardSerializer, StateSerializer};

    fn round<T: serde::Serialize + serde::de::DeserializeOwned + 'static>(v: T) -> Decoded {
        let s = PostcardSerializer::<T>::new();
        let mut b = Vec::new();
        s.serialize(&v, &mut b).unwrap();
        decode(&s.snapshot(), &b).unwrap().unwrap()
    }

    #[test]
    fn decodes_what_postcard_wrote() {
        assert_eq!(round(300u64), Decoded::UInt(300));
        assert_eq!(round(-300i64), Decoded::Int(-300));
        assert_eq!(round(i32::MIN), Decoded::Int(i128::from(i32::MIN)));
        assert_eq!(round(u128::MAX), Decoded::UInt(u128::MAX));
        assert_eq!(round(-5i8), Decoded::Int(-5));
        assert_eq!(round(2.5f64), Decoded::Float(2.5));
        assert_eq!(round(true), Decoded::Bool(true));
        assert_eq!(round('é'), Decoded::Str("é".into()));
        assert_eq!(round(()), Decoded::Unit);
        assert_eq!(round(vec![1u8, 2]), Decoded::Bytes(vec![1, 2]));
        assert_eq!(
            round(vec!["a".to_string()]),
            Decoded::Seq(vec![Decoded::Str("a".into())])
        );
        assert_eq!(round(Some(3u32)), Decoded::Some(Box::new(Decoded::UInt(3))));
        assert_eq!(round(None::<i64>), Decoded::None);
        // A tuple outside the built-in list is unnamed: its schema says nothing.
        let s = PostcardSerializer::<(u64, i64, String)>::new();
        assert!(decode(&s.snapshot(), b"\x01\x01\x00").is_none());
        assert_eq!(
            round((1u64, "x".to_string(), 2u64)),
            Decoded::Seq(vec![
                Decoded::UInt(1),
                Decoded::Str("x".into()),
                Decoded::UInt(2)
            ])
        );
    }

    #[test]
    fn other_serializers_and_damage() {
        let f = FixedWidthSerializer::<i64>::new();
        let mut b = Vec::new();
        f.serialize(&-2, &mut b).unwrap();
        assert_eq!(
            decode(&f.snapshot(), &b).unwrap().unwrap(),
            Decoded::Int(-2)
        );
        assert_eq!(
            decode(&BytesSerializer.snapshot(), b"ab").unwrap().unwrap(),
            Decoded::Bytes(b"ab".to_vec())
        );
        // A user's type: not decodable here.
        #[derive(serde::Serialize, serde::Deserialize)]
        struct Order {
            id: u64,
        }
        assert!(decode(&PostcardSerializer::<Order>::new().snapshot(), b"\x01").is_none());
        // Bytes that do not fit the type.
        let s = PostcardSerializer::<String>::new().snapshot();
        assert!(decode(&s, b"\x05ab").unwrap().is_err());
        let s = PostcardSerializer::<u64>::new().snapshot();
        assert!(decode(&s, b"\x01\x02").unwrap().is_err());
        assert!(decode(&s, &[0xff; 20]).unwrap().is_err());
    }

    #[test]
    fn encodes_text_as_the_serializers_do() {
        fn same<T: serde::Serialize + serde::de::DeserializeOwned + 'static>(v: T, text: &str) {
            let s = PostcardSerializer::<T>::new();
            let mut b = Vec::new();
            s.serialize(&v, &mut b).unwrap();
            assert_eq!(
                encode_text(&s.snapshot(), text).unwrap().unwrap(),
                b,
                "{text}"
            );
        }
        same(1001u64, "1001");
        same(-1001i64, "-1001");
        same(7u8, "7");
        same(-7i8, "-7");
        same("ann".to_string(), "ann");
        same(false, "false");
        let f = FixedWidthSerializer::<u64>::new();
        assert_eq!(
            encode_text(&f.snapshot(), "1001").unwrap().unwrap(),
            1001u64.to_be_bytes()
        );
        let f = FixedWidthSerializer::<i32>::new();
        assert_eq!(
            encode_text(&f.snapshot(), "-3").unwrap().unwrap(),
            (-3i32).to_be_bytes()
        );
        assert!(encode_text(&f.snapshot(), "99999999999").unwrap().is_err());
        let u = PostcardSerializer::<u32>::new().snapshot();
        assert!(encode_text(&u, "-1").unwrap().is_err());
        let t = PostcardSerializer::<(u64, u64)>::new().snapshot();
        assert!(encode_text(&t, "1").is_none());
    }
}
