//! Serializers for keys, namespaces and values, with snapshots for schema evolution.
//!
//! The default is [`PostcardSerializer`] (serde + postcard). A custom format implements
//! [`StateSerializer`]. Every checkpoint stores a [`SerializerSnapshot`] per serializer; on
//! restore the new serializer judges the old snapshot with [`StateSerializer::compatibility`].

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A serializer's message when it cannot write or read a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerdeError(pub String);

impl fmt::Display for SerdeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SerdeError {}

/// What a checkpoint remembers of the serializer that wrote a state.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerializerSnapshot {
    /// Identifies the serializer family (e.g. `"postcard"`).
    pub id: String,
    /// The format version within the family.
    pub version: u32,
    /// Free-form schema information (for postcard: the Rust type name, or what the user set).
    pub schema: Vec<u8>,
}

impl fmt::Display for SerializerSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} v{} ({})",
            self.id,
            self.version,
            String::from_utf8_lossy(&self.schema)
        )
    }
}

/// Reads bytes written by an older serializer into the current type.
pub type Migration<T> = Arc<dyn Fn(&[u8]) -> Result<T, SerdeError> + Send + Sync>;

/// The verdict of a new serializer on the snapshot of an old one.
pub enum Compatibility<T> {
    /// The bytes can be read as they are.
    CompatibleAsIs,
    /// The bytes must be read with this migration function.
    CompatibleAfterMigration(Migration<T>),
    /// The bytes cannot be read; the string says why.
    Incompatible(String),
}

impl<T> fmt::Debug for Compatibility<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Compatibility::CompatibleAsIs => f.write_str("CompatibleAsIs"),
            Compatibility::CompatibleAfterMigration(_) => f.write_str("CompatibleAfterMigration"),
            Compatibility::Incompatible(r) => write!(f, "Incompatible({r:?})"),
        }
    }
}

/// Turns values of `T` into bytes and back, and judges older formats.
pub trait StateSerializer<T>: Send + Sync + 'static {
    /// Appends the bytes of `value` to `out`.
    fn serialize(&self, value: &T, out: &mut Vec<u8>) -> Result<(), SerdeError>;
    /// Reads a value from exactly `bytes`.
    fn deserialize(&self, bytes: &[u8]) -> Result<T, SerdeError>;
    /// Appends the bytes of every value of `values` to `out`, one after the other, and pushes
    /// to `ends` the offset in `out` where each value's bytes end: the bytes are exactly those
    /// of [`StateSerializer::serialize`] per value (list `add_all`/`update` write many elements
    /// with one call instead of one per element).
    ///
    /// The default calls `serialize` per value; override it when a batch can be written faster.
    /// On an error, `out` and `ends` may hold the values before the failing one.
    fn serialize_all(
        &self,
        values: &[T],
        out: &mut Vec<u8>,
        ends: &mut Vec<usize>,
    ) -> Result<(), SerdeError> {
        ends.reserve(values.len());
        for v in values {
            self.serialize(v, out)?;
            ends.push(out.len());
        }
        Ok(())
    }
    /// What a checkpoint stores about this serializer.
    fn snapshot(&self) -> SerializerSnapshot;
    /// Can bytes written by `previous` be read by this serializer?
    ///
    /// The default accepts an identical snapshot and rejects everything else.
    fn compatibility(&self, previous: &SerializerSnapshot) -> Compatibility<T> {
        let current = self.snapshot();
        if &current == previous {
            Compatibility::CompatibleAsIs
        } else {
            Compatibility::Incompatible(format!("written by {previous}, now {current}"))
        }
    }
}

/// The default serializer: serde + postcard, with a version and optional migrations.
///
/// The schema stored in checkpoints defaults to the Rust type name, so restoring a state with a
/// different type is reported as incompatible instead of producing garbage. Set a schema of your
/// own with [`PostcardSerializer::with_schema`] when you rename a type.
pub struct PostcardSerializer<T> {
    version: u32,
    schema: Vec<u8>,
    migrations: Vec<(u32, Migration<T>)>,
    _marker: PhantomData<fn() -> T>,
}

/// The serializer id postcard serializers write into snapshots.
pub const POSTCARD_SERIALIZER_ID: &str = "postcard";

impl<T: Serialize + DeserializeOwned + 'static> PostcardSerializer<T> {
    /// Version 1, schema = the type name of `T`.
    pub fn new() -> Self {
        PostcardSerializer {
            version: 1,
            schema: std::any::type_name::<T>().as_bytes().to_vec(),
            migrations: Vec::new(),
            _marker: PhantomData,
        }
    }

    /// Sets the format version written to snapshots.
    pub fn with_version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Sets the schema bytes written to snapshots (instead of the type name).
    pub fn with_schema(mut self, schema: impl Into<Vec<u8>>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Registers a function that reads bytes written by `from_version` of this serializer.
    pub fn with_migration(
        mut self,
        from_version: u32,
        migrate: impl Fn(&[u8]) -> Result<T, SerdeError> + Send + Sync + 'static,
    ) -> Self {
        self.migrations.push((from_version, Arc::new(migrate)));
        self
    }
}

impl<T: Serialize + DeserializeOwned + 'static> Default for PostcardSerializer<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for PostcardSerializer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostcardSerializer")
            .field("version", &self.version)
            .field("schema", &String::from_utf8_lossy(&self.schema))
            .field("migrations", &self.migrations.len())
            .finish()
    }
}

/// A postcard output that appends to a borrowed `Vec` with `push`/`extend_from_slice` (postcard's
/// own `to_extend` moves the vector in and out and extends byte by byte through an iterator).
struct VecFlavor<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for VecFlavor<'_> {
    type Output = ();

    #[inline(always)]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        // Most pieces are a varint of a few bytes: a byte loop beats a `memcpy` call.
        if data.len() <= 8 {
            self.0.reserve(8);
            for &b in data {
                self.0.push(b);
            }
        } else {
            self.0.extend_from_slice(data);
        }
        Ok(())
    }

    #[inline(always)]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    #[inline(always)]
    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// The number postcard writes as a LEB128 varint for 32- and 64-bit integers (signed ones
/// zigzag-encoded first), `None` for other types: integers (the most common state values)
/// are written without a serde call. The type tests are constants after monomorphization.
#[inline(always)]
fn varint_of<T: 'static>(value: &T) -> Option<u64> {
    let v = value as &dyn std::any::Any;
    if let Some(x) = v.downcast_ref::<u64>() {
        Some(*x)
    } else if let Some(x) = v.downcast_ref::<u32>() {
        Some(u64::from(*x))
    } else if let Some(x) = v.downcast_ref::<i64>() {
        Some(((x << 1) ^ (x >> 63)) as u64)
    } else {
        v.downcast_ref::<i32>()
            .map(|x| u64::from(((x << 1) ^ (x >> 31)) as u32))
    }
}

/// The bytes of a `Vec<u8>` or `String` value, `None` for other types: postcard writes them as
/// a varint length and the bytes, which is done here without a serde call per byte (the
/// derived `Vec<u8>` serialization is a sequence of one-byte elements).
#[inline(always)]
fn bytes_of<T: 'static>(value: &T) -> Option<&[u8]> {
    let v = value as &dyn std::any::Any;
    if let Some(b) = v.downcast_ref::<Vec<u8>>() {
        Some(b)
    } else {
        v.downcast_ref::<String>().map(|s| s.as_bytes())
    }
}

/// Appends postcard's encoding of `value` to the serializer's vector: integers and byte
/// strings directly (the same bytes), everything else through serde.
#[inline(always)]
fn write_postcard<T: Serialize + 'static>(
    value: &T,
    ser: &mut postcard::Serializer<VecFlavor<'_>>,
) -> Result<(), SerdeError> {
    if let Some(x) = varint_of(value) {
        put_varint(ser.output.0, x);
    } else if let Some(b) = bytes_of(value) {
        put_bytes(ser.output.0, b);
    } else {
        value
            .serialize(ser)
            .map_err(|e| SerdeError(e.to_string()))?;
    }
    Ok(())
}

/// Appends postcard's encoding of a byte string: the varint length, then the bytes.
#[inline(always)]
fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.reserve(b.len() + 10);
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Appends the LEB128 bytes of `x`.
#[inline(always)]
fn put_varint(out: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        out.push(x as u8 | 0x80);
        x >>= 7;
    }
    out.push(x as u8);
}

impl<T: Serialize + DeserializeOwned + 'static> StateSerializer<T> for PostcardSerializer<T> {
    #[inline]
    fn serialize(&self, value: &T, out: &mut Vec<u8>) -> Result<(), SerdeError> {
        write_postcard(
            value,
            &mut postcard::Serializer {
                output: VecFlavor(out),
            },
        )
    }

    fn serialize_all(
        &self,
        values: &[T],
        out: &mut Vec<u8>,
        ends: &mut Vec<usize>,
    ) -> Result<(), SerdeError> {
        ends.reserve(values.len());
        let mut ser = postcard::Serializer {
            output: VecFlavor(out),
        };
        for v in values {
            write_postcard(v, &mut ser)?;
            ends.push(ser.output.0.len());
        }
        Ok(())
    }

    #[inline]
    fn deserialize(&self, bytes: &[u8]) -> Result<T, SerdeError> {
        match postcard::take_from_bytes::<T>(bytes) {
            Ok((v, [])) => Ok(v),
            Ok((_, rest)) => Err(SerdeError(format!(
                "{} trailing bytes after the value",
                rest.len()
            ))),
            Err(e) => Err(SerdeError(e.to_string())),
        }
    }

    fn snapshot(&self) -> SerializerSnapshot {
        SerializerSnapshot {
            id: POSTCARD_SERIALIZER_ID.to_string(),
            version: self.version,
            schema: self.schema.clone(),
        }
    }

    fn compatibility(&self, previous: &SerializerSnapshot) -> Compatibility<T> {
        if previous.id != POSTCARD_SERIALIZER_ID {
            return Compatibility::Incompatible(format!(
                "written by serializer '{}', now '{POSTCARD_SERIALIZER_ID}'",
                previous.id
            ));
        }
        if previous.version == self.version {
            if previous.schema == self.schema {
                return Compatibility::CompatibleAsIs;
            }
            return Compatibility::Incompatible(format!(
                "schema changed from '{}' to '{}' without a version bump and migration",
                String::from_utf8_lossy(&previous.schema),
                String::from_utf8_lossy(&self.schema)
            ));
        }
        match self.migrations.iter().find(|(v, _)| *v == previous.version) {
            Some((_, m)) => Compatibility::CompatibleAfterMigration(Arc::clone(m)),
            None => Compatibility::Incompatible(format!(
                "written by version {}, now version {} and no migration from version {} is registered",
                previous.version, self.version, previous.version
            )),
        }
    }
}

/// Integers that [`FixedWidthSerializer`] writes as big-endian bytes of their full width.
pub trait FixedWidthInt: Copy + Send + Sync + 'static {
    /// Width in bytes.
    const WIDTH: usize;
    /// Appends the big-endian bytes.
    fn put(self, out: &mut Vec<u8>);
    /// Reads exactly `WIDTH` big-endian bytes.
    fn get(bytes: &[u8]) -> Option<Self>;
}

macro_rules! fixed_width {
    ($($t:ty),*) => {$(
        impl FixedWidthInt for $t {
            const WIDTH: usize = std::mem::size_of::<$t>();
            #[inline]
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_be_bytes());
            }
            #[inline]
            fn get(bytes: &[u8]) -> Option<Self> {
                Some(<$t>::from_be_bytes(bytes.try_into().ok()?))
            }
        }
    )*};
}
fixed_width!(u8, u16, u32, u64, u128, i8, i16, i32, i64, i128);

/// The serializer id fixed-width serializers write into snapshots.
pub const FIXED_WIDTH_SERIALIZER_ID: &str = "fixed-width-be";

/// Integers as fixed-width big-endian bytes (what Flink's `LongSerializer` does for `Long`).
///
/// Use it for integer keys: encoding is branch-free, which keeps `set_current_key` cheap on hot
/// paths (postcard's variable-length integers branch on the value), and the bytes sort like the
/// numbers for unsigned types.
#[derive(Debug, Clone, Copy, Default)]
pub struct FixedWidthSerializer<T>(PhantomData<fn() -> T>);

impl<T: FixedWidthInt> FixedWidthSerializer<T> {
    /// The serializer for `T`.
    pub fn new() -> Self {
        FixedWidthSerializer(PhantomData)
    }
}

impl<T: FixedWidthInt> StateSerializer<T> for FixedWidthSerializer<T> {
    #[inline]
    fn serialize(&self, value: &T, out: &mut Vec<u8>) -> Result<(), SerdeError> {
        value.put(out);
        Ok(())
    }

    fn serialize_all(
        &self,
        values: &[T],
        out: &mut Vec<u8>,
        ends: &mut Vec<usize>,
    ) -> Result<(), SerdeError> {
        out.reserve(values.len() * T::WIDTH);
        ends.reserve(values.len());
        for v in values {
            v.put(out);
            ends.push(out.len());
        }
        Ok(())
    }

    #[inline]
    fn deserialize(&self, bytes: &[u8]) -> Result<T, SerdeError> {
        T::get(bytes).ok_or_else(|| {
            SerdeError(format!(
                "expected {} bytes for {}, found {}",
                T::WIDTH,
                std::any::type_name::<T>(),
                bytes.len()
            ))
        })
    }

    fn snapshot(&self) -> SerializerSnapshot {
        SerializerSnapshot {
            id: FIXED_WIDTH_SERIALIZER_ID.to_string(),
            version: 1,
            schema: std::any::type_name::<T>().as_bytes().to_vec(),
        }
    }
}

/// The serializer id [`BytesSerializer`] writes into snapshots.
pub const BYTES_SERIALIZER_ID: &str = "raw-bytes";

/// Byte vectors as they are (Flink's `BytePrimitiveArraySerializer`): one copy, no per-byte
/// encoding. postcard writes a `Vec<u8>` element by element; use this for opaque payloads.
#[derive(Debug, Clone, Copy, Default)]
pub struct BytesSerializer;

impl StateSerializer<Vec<u8>> for BytesSerializer {
    #[inline]
    fn serialize(&self, value: &Vec<u8>, out: &mut Vec<u8>) -> Result<(), SerdeError> {
        out.extend_from_slice(value);
        Ok(())
    }

    #[inline]
    fn deserialize(&self, bytes: &[u8]) -> Result<Vec<u8>, SerdeError> {
        Ok(bytes.to_vec())
    }

    fn snapshot(&self) -> SerializerSnapshot {
        SerializerSnapshot {
            id: BYTES_SERIALIZER_ID.to_string(),
            version: 1,
            schema: Vec::new(),
        }
    }
}

/// How to read bytes of one serializer role after a restore: as is, or through a migration.
pub(crate) enum Reader<T> {
    Direct(Arc<dyn StateSerializer<T>>),
    Migrate(Migration<T>),
}

impl<T: 'static> Reader<T> {
    pub(crate) fn read(&self, bytes: &[u8]) -> Result<T, SerdeError> {
        match self {
            Reader::Direct(s) => s.deserialize(bytes),
            Reader::Migrate(m) => m(bytes),
        }
    }
}

/// Decides how to read bytes written under `previous` with `current`, or says why not.
pub fn resolve_reader<T: 'static>(
    current: &Arc<dyn StateSerializer<T>>,
    previous: &SerializerSnapshot,
) -> Result<ResolvedReader<T>, String> {
    match current.compatibility(previous) {
        Compatibility::CompatibleAsIs => Ok(ResolvedReader(Reader::Direct(Arc::clone(current)))),
        Compatibility::CompatibleAfterMigration(m) => Ok(ResolvedReader(Reader::Migrate(m))),
        Compatibility::Incompatible(reason) => Err(reason),
    }
}

/// Reads the bytes of a restored snapshot with the serializer (or migration) that fits them.
pub struct ResolvedReader<T>(pub(crate) Reader<T>);

impl<T: 'static> ResolvedReader<T> {
    /// Reads one value.
    pub fn read(&self, bytes: &[u8]) -> Result<T, SerdeError> {
        self.0.read(bytes)
    }

    /// True when the bytes go through a user migration function.
    pub fn is_migration(&self) -> bool {
        matches!(self.0, Reader::Migrate(_))
    }
}

impl<T: 'static> fmt::Debug for ResolvedReader<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_migration() {
            "ResolvedReader(migration)"
        } else {
            "ResolvedReader(as is)"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte vectors and strings, written without serde, are byte for byte what postcard
    /// writes (and read back), at the lengths where the varint length changes size.
    #[test]
    fn byte_vectors_and_strings_are_written_as_postcard_does() {
        for len in [0usize, 1, 127, 128, 300, 16_383, 16_384, 70_000] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let text: String = (0..len)
                .map(|i| char::from(b'a' + (i % 26) as u8))
                .collect();
            let ser = PostcardSerializer::<Vec<u8>>::new();
            let mut out = vec![9u8];
            ser.serialize(&bytes, &mut out).unwrap();
            assert_eq!(
                out[1..],
                postcard::to_allocvec(&bytes).unwrap()[..],
                "{len}"
            );
            assert_eq!(ser.deserialize(&out[1..]).unwrap(), bytes);
            let ser = PostcardSerializer::<String>::new();
            let mut out = Vec::new();
            ser.serialize(&text, &mut out).unwrap();
            assert_eq!(out, postcard::to_allocvec(&text).unwrap(), "{len}");
            assert_eq!(ser.deserialize(&out).unwrap(), text);
            let (mut all, mut ends) = (Vec::new(), Vec::new());
            let values = [text.clone(), String::new(), text.clone()];
            ser.serialize_all(&values, &mut all, &mut ends).unwrap();
            let mut want = Vec::new();
            for v in &values {
                want.extend(postcard::to_allocvec(v).unwrap());
            }
            assert_eq!(all, want);
            assert_eq!(ends.len(), 3);
        }
    }

    /// Where LEB128 varints change length, and the extremes.
    const VARINT_EDGES: [u64; 11] = [
        0,
        1,
        63,
        64,
        127,
        128,
        16_383,
        16_384,
        1 << 31,
        1 << 32,
        u64::MAX,
    ];

    #[test]
    fn postcard_round_trip_and_trailing_bytes() {
        let s = PostcardSerializer::<(u64, String)>::new();
        let mut out = Vec::new();
        s.serialize(&(7, "x".into()), &mut out).unwrap();
        assert_eq!(s.deserialize(&out).unwrap(), (7, "x".to_string()));
        out.push(0);
        assert!(s.deserialize(&out).unwrap_err().0.contains("trailing"));
        assert!(s.deserialize(&[]).is_err());
    }

    /// `serialize_all` writes the bytes `serialize` writes per value (postcard's, fixed width's
    /// and the default of other serializers), appended after what `out` held, with each end.
    #[test]
    fn serialize_all_writes_the_bytes_of_serialize_per_value() {
        fn check<T: fmt::Debug + 'static>(s: &dyn StateSerializer<T>, values: &[T]) {
            let mut one = vec![0xaa];
            let mut expected_ends = Vec::new();
            for v in values {
                s.serialize(v, &mut one).unwrap();
                expected_ends.push(one.len());
            }
            let (mut all, mut ends) = (vec![0xaa], vec![7]);
            s.serialize_all(values, &mut all, &mut ends).unwrap();
            assert_eq!(all, one);
            assert_eq!(ends[0], 7);
            assert_eq!(ends[1..], expected_ends);
        }
        let strings: Vec<(u64, String)> = (0..50u64)
            .map(|i| (i * 977 * i, "s".repeat(i as usize * 3)))
            .collect();
        check(&PostcardSerializer::new(), &strings);
        let edges = VARINT_EDGES;
        check(&PostcardSerializer::<u64>::new(), &edges);
        let u32s: Vec<u32> = edges.iter().map(|x| *x as u32).collect();
        check(&PostcardSerializer::<u32>::new(), &u32s);
        let i64s: Vec<i64> = edges
            .iter()
            .flat_map(|x| [*x as i64, -(*x as i64)])
            .collect();
        check(
            &PostcardSerializer::<i64>::new(),
            &[&i64s[..], &[i64::MIN, i64::MAX]].concat(),
        );
        let i32s: Vec<i32> = i64s.iter().map(|x| *x as i32).collect();
        check(
            &PostcardSerializer::<i32>::new(),
            &[&i32s[..], &[i32::MIN, i32::MAX]].concat(),
        );
        check(&FixedWidthSerializer::<i32>::new(), &[-1, 0, 7, i32::MAX]);
        check(&BytesSerializer, &[vec![], vec![1, 2], vec![3; 300]]);
        check(&PostcardSerializer::<u8>::new(), &[]);
    }

    /// The postcard serializer's bytes are postcard's own (canonical savepoints depend on them).
    #[test]
    fn postcard_bytes_are_postcards() {
        let v: (u64, String, Vec<i32>, Option<bool>) = (300, "ab".into(), vec![-1, 64], Some(true));
        let mut out = vec![5];
        PostcardSerializer::new().serialize(&v, &mut out).unwrap();
        let mut expected = vec![5];
        expected.extend(postcard::to_extend(&v, Vec::new()).unwrap());
        assert_eq!(out, expected);
        // Integers take a path of their own: the same bytes, one value or many.
        fn same<T: Serialize + DeserializeOwned + PartialEq + fmt::Debug + Copy + 'static>(
            values: &[T],
        ) {
            let s = PostcardSerializer::<T>::new();
            let (mut all, mut ends) = (Vec::new(), Vec::new());
            s.serialize_all(values, &mut all, &mut ends).unwrap();
            let mut start = 0;
            for (v, end) in values.iter().zip(ends) {
                let theirs = postcard::to_extend(v, Vec::new()).unwrap();
                let mut ours = Vec::new();
                s.serialize(v, &mut ours).unwrap();
                assert_eq!(ours, theirs, "{v:?}");
                assert_eq!(all[start..end], theirs[..], "{v:?}");
                assert_eq!(s.deserialize(&ours).unwrap(), *v);
                start = end;
            }
        }
        let edges = VARINT_EDGES;
        same(&edges);
        same(&edges.map(|x| x as u32));
        same(&edges.map(|x| x as i64));
        same(&edges.map(|x| (x as i64).wrapping_neg()));
        same(&edges.map(|x| x as i32));
        same(&edges.map(|x| (x as i32).wrapping_neg()));
        same(&[i64::MIN, i64::MAX]);
        same(&[i32::MIN, i32::MAX]);
    }

    #[test]
    fn raw_bytes() {
        let mut out = vec![9];
        BytesSerializer.serialize(&vec![1, 2, 3], &mut out).unwrap();
        assert_eq!(out, [9, 1, 2, 3]);
        assert_eq!(
            BytesSerializer.deserialize(&out[1..]).unwrap(),
            vec![1, 2, 3]
        );
        assert!(matches!(
            BytesSerializer.compatibility(&PostcardSerializer::<Vec<u8>>::new().snapshot()),
            Compatibility::Incompatible(_)
        ));
    }

    #[test]
    fn fixed_width_integers() {
        let s = FixedWidthSerializer::<u64>::new();
        let mut out = Vec::new();
        s.serialize(&0x0102_0304_0506_0708, &mut out).unwrap();
        assert_eq!(out, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(s.deserialize(&out).unwrap(), 0x0102_0304_0506_0708);
        assert!(s
            .deserialize(&out[..7])
            .unwrap_err()
            .0
            .contains("expected 8 bytes"));
        let i = FixedWidthSerializer::<i16>::new();
        let mut out = Vec::new();
        i.serialize(&-2, &mut out).unwrap();
        assert_eq!(i.deserialize(&out).unwrap(), -2);
        assert!(matches!(
            s.compatibility(&PostcardSerializer::<u64>::new().snapshot()),
            Compatibility::Incompatible(_)
        ));
    }

    #[test]
    fn compatibility_outcomes() {
        let v1 = PostcardSerializer::<u32>::new().with_schema("n");
        let v2 = PostcardSerializer::<u64>::new()
            .with_schema("n")
            .with_version(2)
            .with_migration(1, |b| {
                PostcardSerializer::<u32>::new()
                    .deserialize(b)
                    .map(|v| u64::from(v) * 10)
            });
        assert!(matches!(
            v1.compatibility(&v1.snapshot()),
            Compatibility::CompatibleAsIs
        ));
        let mut bytes = Vec::new();
        v1.serialize(&4, &mut bytes).unwrap();
        match v2.compatibility(&v1.snapshot()) {
            Compatibility::CompatibleAfterMigration(m) => assert_eq!(m(&bytes).unwrap(), 40),
            other => panic!("expected migration, got {other:?}"),
        }
        let other_type = PostcardSerializer::<String>::new();
        assert!(matches!(
            other_type.compatibility(&PostcardSerializer::<u64>::new().snapshot()),
            Compatibility::Incompatible(_)
        ));
        let foreign = SerializerSnapshot {
            id: "avro".into(),
            version: 1,
            schema: vec![],
        };
        match v1.compatibility(&foreign) {
            Compatibility::Incompatible(r) => assert!(r.contains("avro")),
            other => panic!("{other:?}"),
        }
    }
}
