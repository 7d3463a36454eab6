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
    /// Schema information: for postcard the schema name (a fixed name for built-in types, the
    /// name the user gave, or empty for an unnamed type); snapshots written before schema names
    /// existed hold the Rust type name of the time (read as a legacy alias, see
    /// [`PostcardSerializer`]).
    pub schema: Vec<u8>,
}

impl fmt::Display for SerializerSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} v{} ({})",
            self.id,
            self.version,
            SchemaShown(&self.schema)
        )
    }
}

/// Shows schema bytes in messages: the name in quotes, or "an unnamed type".
struct SchemaShown<'a>(&'a [u8]);

impl fmt::Display for SchemaShown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("an unnamed type")
        } else {
            write!(f, "schema '{}'", String::from_utf8_lossy(self.0))
        }
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

/// The default serializer: serde + postcard, with a schema name, a version and optional
/// migrations.
///
/// # Schema names
///
/// Checkpoints store the name of the schema a state was written with, and a restore compares it
/// with the name of the new job's serializer. Names never come from `std::any::type_name` (whose
/// output is unspecified and changes when a type moves to another module or crate):
///
/// - **Built-in types** get a fixed name: the integers, `f32`, `f64`, `bool`, `char`, `()`,
///   `String`, `Vec<u8>`, and a fixed set of common `Vec`s, `Option`s and tuples of `u64`,
///   `i64`, `u32`, `i32` and `String`, named as they are written in Rust (`"u64"`, `"String"`,
///   `"(u64, String)"`, `"Vec<u64>"`); [`builtin_schema_name`] tells whether a type has one
///   (other tuples and containers are unnamed, as your own types). A state restored with
///   another built-in type (a `u64` state read as a `String`) is incompatible.
/// - **Your own types** are unnamed unless you name them with [`PostcardSerializer::named`]
///   (`PostcardSerializer::<Order>::named("shop.Order")`). An unnamed type is compatible with any
///   snapshot that is not of a built-in type: moving or renaming the Rust type changes nothing,
///   and [`PostcardSerializer::with_version`] plus a migration is how you say the bytes changed.
///   Naming a previously unnamed state is accepted as is.
/// - **A changed name** is a decision, never an accident: restoring bytes written under
///   `"shop.Order"` with a serializer named `"shop.Purchase"` is an
///   [`Error::IncompatibleSerializer`](crate::Error::IncompatibleSerializer) whose message names
///   both schemas and the three ways out: rename it back, bump the version and add a migration
///   ([`PostcardSerializer::with_migration`]), or declare the rename compatible with
///   [`PostcardSerializer::with_alias`].
/// - **Legacy snapshots** (written before schema names, holding the Rust type name of the time,
///   e.g. `alloc::string::String` or `(u64, u64)`) restore as they did: a built-in type accepts
///   the type name it used to be written with, an unnamed type accepts any non-built-in one, and
///   a named type accepts the old type name once declared with `with_alias`.
///
/// When the versions differ, the schema names are not compared: the migration registered for
/// the old version decides.
pub struct PostcardSerializer<T> {
    version: u32,
    schema: Vec<u8>,
    /// Legacy names (`type_name` of built-ins before schema names existed) read as is.
    legacy: Option<&'static str>,
    /// Names the user declared as the same schema (renames).
    aliases: Vec<Vec<u8>>,
    migrations: Vec<(u32, Migration<T>)>,
    _marker: PhantomData<fn() -> T>,
}

/// The serializer id postcard serializers write into snapshots.
pub const POSTCARD_SERIALIZER_ID: &str = "postcard";

/// Fixed schema names of built-in types, each with the `std::any::type_name` the type was
/// written with before schema names existed (a constant here, recorded from Rust 1.x; never
/// computed at run time).
macro_rules! builtin_names {
    ($($t:ty => $legacy:expr),* $(,)?) => {
        /// The fixed schema name of a built-in type and the legacy type name it was stored
        /// under by earlier releases.
        fn builtin_entry<T: 'static>() -> Option<(&'static str, &'static str)> {
            use std::any::TypeId;
            let id = TypeId::of::<T>();
            $(
                if id == TypeId::of::<$t>() {
                    return Some((stringify!($t), $legacy));
                }
            )*
            None
        }

        /// Every built-in name and legacy type name (to tell built-in snapshots apart).
        const BUILTIN_NAMES: &[(&str, &str)] = &[$((stringify!($t), $legacy)),*];
    };
}

/// `type_name::<String>()` as earlier releases stored it.
const LEGACY_STRING: &str = "alloc::string::String";

// The list is part of the snapshot format: a type added later turns its default from unnamed
// (empty schema) into named, so an addition must also read the empty schema as is.
builtin_names! {
    u8 => "u8", u16 => "u16", u32 => "u32", u64 => "u64", u128 => "u128", usize => "usize",
    i8 => "i8", i16 => "i16", i32 => "i32", i64 => "i64", i128 => "i128", isize => "isize",
    f32 => "f32", f64 => "f64", bool => "bool", char => "char", () => "()",
    String => LEGACY_STRING,
    Vec<u8> => "alloc::vec::Vec<u8>",
    Vec<u32> => "alloc::vec::Vec<u32>",
    Vec<u64> => "alloc::vec::Vec<u64>",
    Vec<i32> => "alloc::vec::Vec<i32>",
    Vec<i64> => "alloc::vec::Vec<i64>",
    Vec<String> => "alloc::vec::Vec<alloc::string::String>",
    Option<u32> => "core::option::Option<u32>",
    Option<u64> => "core::option::Option<u64>",
    Option<i32> => "core::option::Option<i32>",
    Option<i64> => "core::option::Option<i64>",
    Option<String> => "core::option::Option<alloc::string::String>",
    (u64, u64) => "(u64, u64)",
    (u64, i64) => "(u64, i64)",
    (i64, i64) => "(i64, i64)",
    (i64, u64) => "(i64, u64)",
    (u32, u32) => "(u32, u32)",
    (u32, u64) => "(u32, u64)",
    (u64, u32) => "(u64, u32)",
    (i32, i32) => "(i32, i32)",
    (u64, String) => "(u64, alloc::string::String)",
    (String, u64) => "(alloc::string::String, u64)",
    (i64, String) => "(i64, alloc::string::String)",
    (String, i64) => "(alloc::string::String, i64)",
    (u32, String) => "(u32, alloc::string::String)",
    (String, u32) => "(alloc::string::String, u32)",
    (String, String) => "(alloc::string::String, alloc::string::String)",
    (u64, u64, u64) => "(u64, u64, u64)",
    (i64, i64, i64) => "(i64, i64, i64)",
    (u64, u64, i64) => "(u64, u64, i64)",
    (u64, i64, i64) => "(u64, i64, i64)",
    (u32, u32, u32) => "(u32, u32, u32)",
    (u64, String, u64) => "(u64, alloc::string::String, u64)",
}

/// The fixed schema name of `T` if it is a built-in type (see [`PostcardSerializer`]), `None`
/// for other types.
pub fn builtin_schema_name<T: 'static>() -> Option<&'static str> {
    builtin_entry::<T>().map(|(name, _)| name)
}

/// True when `schema` is a built-in name or the legacy type name of a built-in.
fn is_builtin_schema(schema: &[u8]) -> bool {
    BUILTIN_NAMES
        .iter()
        .any(|(name, legacy)| schema == name.as_bytes() || schema == legacy.as_bytes())
}

impl<T: Serialize + DeserializeOwned + 'static> PostcardSerializer<T> {
    /// Version 1; the fixed name of a built-in `T`, otherwise unnamed (see the type's docs).
    pub fn new() -> Self {
        let (schema, legacy) = match builtin_entry::<T>() {
            Some((name, legacy)) => (name.as_bytes().to_vec(), Some(legacy)),
            None => (Vec::new(), None),
        };
        PostcardSerializer {
            version: 1,
            schema,
            legacy,
            aliases: Vec::new(),
            migrations: Vec::new(),
            _marker: PhantomData,
        }
    }

    /// Version 1 with the schema name `name`, a stable name you control (e.g. `"shop.Order"`):
    /// a snapshot written under another name is incompatible unless declared with
    /// [`PostcardSerializer::with_alias`] or migrated.
    pub fn named(name: impl Into<String>) -> Self {
        Self::new().with_schema(name.into())
    }

    /// Sets the format version written to snapshots.
    pub fn with_version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Sets the schema name written to snapshots (what [`PostcardSerializer::named`] sets);
    /// empty bytes make the type unnamed.
    pub fn with_schema(mut self, schema: impl Into<Vec<u8>>) -> Self {
        self.schema = schema.into();
        self.legacy = None;
        self
    }

    /// Declares that bytes written under the schema name `old_name` (at the same version) are
    /// read as they are: a rename that changed nothing in the bytes. Also accepts the Rust type
    /// name a snapshot from before schema names holds (e.g. `"my_app::model::Order"`).
    pub fn with_alias(mut self, old_name: impl Into<Vec<u8>>) -> Self {
        self.aliases.push(old_name.into());
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

    /// Whether bytes stored under `previous` (at this serializer's version) read as they are.
    fn same_schema(&self, previous: &[u8]) -> bool {
        if previous == self.schema.as_slice()
            || self.legacy.is_some_and(|l| previous == l.as_bytes())
            || self.aliases.iter().any(|a| a.as_slice() == previous)
        {
            return true;
        }
        if self.schema.is_empty() {
            // Unnamed: anything that is not of a built-in type (a legacy type name, or a
            // snapshot of another unnamed type) is the user's to vouch for.
            return !is_builtin_schema(previous);
        }
        // Named now, unnamed before: naming a state is not a rename.
        previous.is_empty() && self.legacy.is_none()
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
            .field("aliases", &self.aliases.len())
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
            if self.same_schema(&previous.schema) {
                return Compatibility::CompatibleAsIs;
            }
            return Compatibility::Incompatible(format!(
                "written as {} (postcard v{}), now {} of Rust type {} (postcard v{}); \
                 rename the schema back, or bump the version (with_version({})) and add a \
                 migration from version {} (with_migration), or declare the bytes unchanged \
                 (with_alias({:?}))",
                SchemaShown(&previous.schema),
                previous.version,
                SchemaShown(&self.schema),
                std::any::type_name::<T>(),
                self.version,
                self.version.saturating_add(1),
                self.version,
                String::from_utf8_lossy(&previous.schema),
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
    /// The schema name written to snapshots (the Rust name of the type, e.g. `"u64"`).
    const NAME: &'static str;
    /// Appends the big-endian bytes.
    fn put(self, out: &mut Vec<u8>);
    /// Reads exactly `WIDTH` big-endian bytes.
    fn get(bytes: &[u8]) -> Option<Self>;
}

macro_rules! fixed_width {
    ($($t:ty),*) => {$(
        impl FixedWidthInt for $t {
            const WIDTH: usize = std::mem::size_of::<$t>();
            const NAME: &'static str = stringify!($t);
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
            schema: T::NAME.as_bytes().to_vec(),
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

    /// Built-in types have fixed names written as in Rust, never `type_name`'s output.
    #[test]
    fn built_in_types_have_fixed_names() {
        let name = |s: SerializerSnapshot| String::from_utf8(s.schema).unwrap();
        assert_eq!(name(PostcardSerializer::<u64>::new().snapshot()), "u64");
        assert_eq!(
            name(PostcardSerializer::<String>::new().snapshot()),
            "String"
        );
        assert_eq!(
            name(PostcardSerializer::<Vec<u8>>::new().snapshot()),
            "Vec<u8>"
        );
        assert_eq!(
            name(PostcardSerializer::<Option<String>>::new().snapshot()),
            "Option<String>"
        );
        assert_eq!(
            name(PostcardSerializer::<(u64, String)>::new().snapshot()),
            "(u64, String)"
        );
        assert_eq!(name(PostcardSerializer::<()>::new().snapshot()), "()");
        assert_eq!(name(FixedWidthSerializer::<i32>::new().snapshot()), "i32");
        #[derive(serde::Serialize, serde::Deserialize)]
        struct Mine(u64);
        assert_eq!(name(PostcardSerializer::<Mine>::new().snapshot()), "");
        assert_eq!(builtin_schema_name::<Mine>(), None);
        assert_eq!(
            builtin_schema_name::<(u64, u64, u64)>(),
            Some("(u64, u64, u64)")
        );
    }

    /// Snapshots from before schema names (type names of the time) keep reading as they did:
    /// built-ins accept their old type name and nothing else; an unnamed type accepts any
    /// non-built-in; a named one only a declared old name.
    #[test]
    fn legacy_type_names_read_as_before() {
        let legacy = |schema: &str| SerializerSnapshot {
            id: POSTCARD_SERIALIZER_ID.into(),
            version: 1,
            schema: schema.as_bytes().to_vec(),
        };
        fn as_is<T>(c: Compatibility<T>) -> bool {
            matches!(c, Compatibility::CompatibleAsIs)
        }
        let string = PostcardSerializer::<String>::new();
        assert!(as_is(
            string.compatibility(&legacy("alloc::string::String"))
        ));
        assert!(!as_is(string.compatibility(&legacy("u64"))));
        assert!(!as_is(string.compatibility(&legacy("app::Order"))));
        assert!(!as_is(string.compatibility(&legacy(""))));
        let pair = PostcardSerializer::<(u64, u64)>::new();
        assert!(as_is(pair.compatibility(&legacy("(u64, u64)"))));
        assert!(!as_is(pair.compatibility(&legacy("(u64, u64, u64)"))));
        assert!(as_is(
            PostcardSerializer::<Vec<String>>::new()
                .compatibility(&legacy("alloc::vec::Vec<alloc::string::String>"))
        ));

        #[derive(serde::Serialize, serde::Deserialize)]
        struct Order(u64);
        let unnamed = PostcardSerializer::<Order>::new();
        assert!(as_is(
            unnamed.compatibility(&legacy("old_crate::model::Order"))
        ));
        assert!(as_is(unnamed.compatibility(&legacy(""))));
        // Not a built-in state, under any of its names.
        for builtin in ["u64", "String", "alloc::string::String", "(u64, u64)"] {
            assert!(!as_is(unnamed.compatibility(&legacy(builtin))), "{builtin}");
        }
        let named = PostcardSerializer::<Order>::named("shop.Order");
        assert!(!as_is(
            named.compatibility(&legacy("old_crate::model::Order"))
        ));
        assert!(as_is(
            named
                .with_alias("old_crate::model::Order")
                .compatibility(&legacy("old_crate::model::Order"))
        ));
    }

    /// A rename is refused with a message naming both schemas, the Rust type and the way out;
    /// an alias or a migration resolves it.
    #[test]
    fn renames_are_decisions() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct Order(u64);
        let before = PostcardSerializer::<Order>::named("shop.Order").snapshot();
        match PostcardSerializer::<Order>::named("shop.Purchase").compatibility(&before) {
            Compatibility::Incompatible(r) => {
                for part in [
                    "'shop.Order'",
                    "'shop.Purchase'",
                    "Order",
                    "with_version(2)",
                    "with_migration",
                    "with_alias(\"shop.Order\")",
                ] {
                    assert!(r.contains(part), "{part} missing from: {r}");
                }
            }
            other => panic!("expected incompatible, got {other:?}"),
        }
        assert!(matches!(
            PostcardSerializer::<Order>::named("shop.Purchase")
                .with_alias("shop.Order")
                .compatibility(&before),
            Compatibility::CompatibleAsIs
        ));
        assert!(matches!(
            PostcardSerializer::<Order>::named("shop.Purchase")
                .with_version(2)
                .with_migration(1, |b| PostcardSerializer::<u64>::new()
                    .deserialize(b)
                    .map(Order))
                .compatibility(&before),
            Compatibility::CompatibleAfterMigration(_)
        ));
        // Naming a previously unnamed state is not a rename.
        let unnamed = PostcardSerializer::<Order>::new().snapshot();
        assert!(matches!(
            PostcardSerializer::<Order>::named("shop.Order").compatibility(&unnamed),
            Compatibility::CompatibleAsIs
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
