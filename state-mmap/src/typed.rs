//! The typed side of registered states behind an object-safe face: serializers, functions,
//! and the conversions restore needs (migration, timestamp stamping).

use std::any::Any;
use std::sync::Arc;

use state_api::{
    AggregateFunction, Error, ReduceFn, ResolvedReader, Result, SerializerRole, StateKind,
    StateMeta, StateName, StateSerializer, StateTtlConfig,
};

use crate::codec::{corrupt_value, list_elements, ts_of, ListEncoding};

pub(crate) fn ser_err<'a>(
    name: &'a StateName,
    what: &'static str,
) -> impl Fn(state_api::SerdeError) -> Error + 'a {
    move |e| Error::Serialize {
        state: name.to_string(),
        what,
        reason: e.0,
    }
}

pub(crate) fn de_err<'a>(
    name: &'a StateName,
    what: &'static str,
) -> impl Fn(state_api::SerdeError) -> Error + 'a {
    move |e| Error::Deserialize {
        state: name.to_string(),
        what,
        reason: e.0,
    }
}

/// Rewrites restored bytes written under older serializers (or without TTL timestamps).
pub(crate) trait Transcoder {
    fn ns(&self, b: &[u8], out: &mut Vec<u8>) -> Result<()>;
    fn user_key(&self, b: &[u8], out: &mut Vec<u8>) -> Result<()>;
    fn value(&self, b: &[u8], out: &mut Vec<u8>) -> Result<()>;
}

/// The object-safe face of a registered state's types.
pub(crate) trait TypedState: Send {
    fn as_any(&self) -> &dyn Any;
    fn kind(&self) -> StateKind;
    /// What snapshots record about the state.
    fn meta(&self, name: &StateName, ttl: Option<&StateTtlConfig>) -> StateMeta;
    /// Serializes a namespace given as `&N`.
    fn ns_bytes(&self, name: &StateName, ns: &dyn Any, out: &mut Vec<u8>) -> Result<()>;
    /// How to read data restored under `meta`; `None` when the bytes can be kept as they are.
    /// `lists` is `(from, to)`: the element encodings of the stored and the wanted list values
    /// (ignored by other kinds).
    fn transcoder(
        &self,
        name: &StateName,
        meta: &StateMeta,
        stamp: Option<i64>,
        lists: (ListEncoding, ListEncoding),
    ) -> Result<Option<Box<dyn Transcoder>>>;
    /// Reducing and aggregating: combines two stored values (without timestamps).
    fn merge_values(
        &self,
        name: &StateName,
        _a: &[u8],
        _b: &[u8],
        _out: &mut Vec<u8>,
    ) -> Result<()> {
        Err(Error::Unsupported {
            state: name.to_string(),
            reason: format!("{} state cannot merge namespaces", self.kind()),
        })
    }
    /// Aggregating: the result of an accumulator into `out` (an `Option<OUT>`).
    fn aggregate_result(
        &self,
        name: &StateName,
        _acc: Option<&[u8]>,
        _out: &mut dyn Any,
    ) -> Result<()> {
        Err(Error::StateKindMismatch {
            state: name.to_string(),
            existing: self.kind(),
            requested: StateKind::Aggregating,
        })
    }
    /// Aggregating: adds the input in `value` (an `Option<IN>`) to `acc`, writes the new
    /// accumulator bytes to `out`.
    fn aggregate_add(
        &self,
        name: &StateName,
        _acc: Option<&[u8]>,
        _value: &mut dyn Any,
        _out: &mut Vec<u8>,
    ) -> Result<()> {
        Err(Error::StateKindMismatch {
            state: name.to_string(),
            existing: self.kind(),
            requested: StateKind::Aggregating,
        })
    }
}

/// Reads with an old serializer and writes with the current one.
struct Recode<T: 'static> {
    reader: ResolvedReader<T>,
    ser: Arc<dyn StateSerializer<T>>,
    name: StateName,
    what: &'static str,
}

impl<T: 'static> Recode<T> {
    fn new(
        name: &StateName,
        meta: &StateMeta,
        role: SerializerRole,
        ser: &Arc<dyn StateSerializer<T>>,
        what: &'static str,
    ) -> Result<Self> {
        Ok(Recode {
            reader: meta.reader_for(role, ser)?,
            ser: Arc::clone(ser),
            name: name.clone(),
            what,
        })
    }
    /// The recoder of a state's namespaces.
    fn namespace(
        name: &StateName,
        meta: &StateMeta,
        ser: &Arc<dyn StateSerializer<T>>,
    ) -> Result<Self> {
        Self::new(name, meta, SerializerRole::Namespace, ser, "namespace")
    }
    fn is_identity(&self) -> bool {
        !self.reader.is_migration()
    }
    fn run(&self, b: &[u8], out: &mut Vec<u8>) -> Result<()> {
        if self.is_identity() {
            out.extend_from_slice(b);
            return Ok(());
        }
        let v = self.reader.read(b).map_err(de_err(&self.name, self.what))?;
        self.ser
            .serialize(&v, out)
            .map_err(ser_err(&self.name, self.what))
    }
}

trait ValueRecode: Send {
    fn recode(&self, b: &[u8], out: &mut Vec<u8>) -> Result<()>;
    fn is_identity(&self) -> bool;
}
impl<T: 'static> ValueRecode for Recode<T> {
    fn recode(&self, b: &[u8], out: &mut Vec<u8>) -> Result<()> {
        self.run(b, out)
    }
    fn is_identity(&self) -> bool {
        Recode::is_identity(self)
    }
}

enum Layout {
    Single,
    List,
    MapEntry,
    /// Timers: everything is in the key; the value is empty.
    Timer,
}

/// Keeps bytes as they are.
struct Same;
impl ValueRecode for Same {
    fn recode(&self, b: &[u8], out: &mut Vec<u8>) -> Result<()> {
        out.extend_from_slice(b);
        Ok(())
    }
    fn is_identity(&self) -> bool {
        true
    }
}

struct GenericTranscoder {
    name: StateName,
    layout: Layout,
    ns: Box<dyn ValueRecode>,
    user_key: Option<Box<dyn ValueRecode>>,
    value: Box<dyn ValueRecode>,
    stamp: Option<i64>,
    /// List element encodings `(stored, wanted)`.
    lists: (ListEncoding, ListEncoding),
}

impl GenericTranscoder {
    fn boxed(self) -> Option<Box<dyn Transcoder>> {
        let identity = self.stamp.is_none()
            && (!matches!(self.layout, Layout::List) || self.lists.0 == self.lists.1)
            && self.ns.is_identity()
            && self.value.is_identity()
            && self.user_key.as_ref().is_none_or(|u| u.is_identity());
        if identity {
            None
        } else {
            Some(Box::new(self))
        }
    }
}

impl Transcoder for GenericTranscoder {
    fn ns(&self, b: &[u8], out: &mut Vec<u8>) -> Result<()> {
        self.ns.recode(b, out)
    }
    fn user_key(&self, b: &[u8], out: &mut Vec<u8>) -> Result<()> {
        match &self.user_key {
            Some(u) => u.recode(b, out),
            None => {
                out.extend_from_slice(b);
                Ok(())
            }
        }
    }
    fn value(&self, b: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let fix = |ts: i64| self.stamp.unwrap_or(ts);
        match self.layout {
            Layout::Timer => {
                out.extend_from_slice(b);
                Ok(())
            }
            Layout::Single | Layout::MapEntry => {
                let ts = ts_of(b).ok_or_else(|| corrupt_value(&self.name, "value"))?;
                out.extend_from_slice(&fix(ts).to_be_bytes());
                self.value.recode(&b[8..], out)
            }
            Layout::List => {
                let (from, to) = self.lists;
                for item in list_elements(b, from, &self.name) {
                    let (ts, e) = item?;
                    let at = to.begin(out, fix(ts));
                    self.value.recode(e, out)?;
                    to.end(out, at);
                }
                Ok(())
            }
        }
    }
}

fn ns_any<N: state_api::Namespace>(
    name: &StateName,
    ser: &Arc<dyn StateSerializer<N>>,
    ns: &dyn Any,
    out: &mut Vec<u8>,
) -> Result<()> {
    let ns = ns
        .downcast_ref::<N>()
        .ok_or_else(|| Error::StateTypeMismatch {
            state: name.to_string(),
            reason: "namespace type differs from the registered one".into(),
        })?;
    ser.serialize(ns, out).map_err(ser_err(name, "namespace"))
}

fn meta_of(
    name: &StateName,
    kind: StateKind,
    ttl: Option<&StateTtlConfig>,
    serializers: Vec<(SerializerRole, state_api::SerializerSnapshot)>,
) -> StateMeta {
    StateMeta {
        name: name.clone(),
        kind,
        ttl_millis: ttl.map(|t| t.ttl_millis()),
        serializers,
    }
}

/// Value state types.
pub(crate) struct ValueT<V, N> {
    pub ser: Arc<dyn StateSerializer<V>>,
    pub ns: Arc<dyn StateSerializer<N>>,
    pub default: Option<V>,
}

/// List state types.
pub(crate) struct ListT<T, N> {
    pub ser: Arc<dyn StateSerializer<T>>,
    pub ns: Arc<dyn StateSerializer<N>>,
}

/// Map state types.
pub(crate) struct MapT<UK, UV, N> {
    pub key_ser: Arc<dyn StateSerializer<UK>>,
    pub value_ser: Arc<dyn StateSerializer<UV>>,
    pub ns: Arc<dyn StateSerializer<N>>,
}

/// Reducing state types.
pub(crate) struct ReducingT<T, N> {
    pub ser: Arc<dyn StateSerializer<T>>,
    pub ns: Arc<dyn StateSerializer<N>>,
    pub reduce: ReduceFn<T>,
}

/// Aggregating state types.
pub(crate) struct AggregatingT<IN, ACC, OUT, N> {
    pub ser: Arc<dyn StateSerializer<ACC>>,
    pub ns: Arc<dyn StateSerializer<N>>,
    pub func: Arc<dyn AggregateFunction<IN, ACC, OUT>>,
}

macro_rules! common {
    ($kind:expr) => {
        fn as_any(&self) -> &dyn Any {
            self
        }
        fn kind(&self) -> StateKind {
            $kind
        }
        fn ns_bytes(&self, name: &StateName, ns: &dyn Any, out: &mut Vec<u8>) -> Result<()> {
            ns_any(name, &self.ns, ns, out)
        }
    };
}

use state_api::{MapKey, Namespace, StateType};

impl<V: StateType, N: Namespace> TypedState for ValueT<V, N> {
    common!(StateKind::Value);
    fn meta(&self, name: &StateName, ttl: Option<&StateTtlConfig>) -> StateMeta {
        meta_of(
            name,
            StateKind::Value,
            ttl,
            vec![
                (SerializerRole::Namespace, self.ns.snapshot()),
                (SerializerRole::Value, self.ser.snapshot()),
            ],
        )
    }
    fn transcoder(
        &self,
        name: &StateName,
        meta: &StateMeta,
        stamp: Option<i64>,
        lists: (ListEncoding, ListEncoding),
    ) -> Result<Option<Box<dyn Transcoder>>> {
        Ok(GenericTranscoder {
            name: name.clone(),
            layout: Layout::Single,
            ns: Box::new(Recode::namespace(name, meta, &self.ns)?),
            user_key: None,
            value: Box::new(Recode::new(
                name,
                meta,
                SerializerRole::Value,
                &self.ser,
                "value",
            )?),
            stamp,
            lists,
        }
        .boxed())
    }
}

impl<T: StateType, N: Namespace> TypedState for ListT<T, N> {
    common!(StateKind::List);
    fn meta(&self, name: &StateName, ttl: Option<&StateTtlConfig>) -> StateMeta {
        meta_of(
            name,
            StateKind::List,
            ttl,
            vec![
                (SerializerRole::Namespace, self.ns.snapshot()),
                (SerializerRole::Value, self.ser.snapshot()),
            ],
        )
    }
    fn transcoder(
        &self,
        name: &StateName,
        meta: &StateMeta,
        stamp: Option<i64>,
        lists: (ListEncoding, ListEncoding),
    ) -> Result<Option<Box<dyn Transcoder>>> {
        Ok(GenericTranscoder {
            name: name.clone(),
            layout: Layout::List,
            ns: Box::new(Recode::namespace(name, meta, &self.ns)?),
            user_key: None,
            value: Box::new(Recode::new(
                name,
                meta,
                SerializerRole::Value,
                &self.ser,
                "list element",
            )?),
            stamp,
            lists,
        }
        .boxed())
    }
}

impl<UK: MapKey, UV: StateType, N: Namespace> TypedState for MapT<UK, UV, N> {
    common!(StateKind::Map);
    fn meta(&self, name: &StateName, ttl: Option<&StateTtlConfig>) -> StateMeta {
        meta_of(
            name,
            StateKind::Map,
            ttl,
            vec![
                (SerializerRole::Namespace, self.ns.snapshot()),
                (SerializerRole::UserKey, self.key_ser.snapshot()),
                (SerializerRole::UserValue, self.value_ser.snapshot()),
            ],
        )
    }
    fn transcoder(
        &self,
        name: &StateName,
        meta: &StateMeta,
        stamp: Option<i64>,
        lists: (ListEncoding, ListEncoding),
    ) -> Result<Option<Box<dyn Transcoder>>> {
        Ok(GenericTranscoder {
            name: name.clone(),
            layout: Layout::MapEntry,
            ns: Box::new(Recode::namespace(name, meta, &self.ns)?),
            user_key: Some(Box::new(Recode::new(
                name,
                meta,
                SerializerRole::UserKey,
                &self.key_ser,
                "map user key",
            )?)),
            value: Box::new(Recode::new(
                name,
                meta,
                SerializerRole::UserValue,
                &self.value_ser,
                "map user value",
            )?),
            stamp,
            lists,
        }
        .boxed())
    }
}

impl<T: StateType, N: Namespace> TypedState for ReducingT<T, N> {
    common!(StateKind::Reducing);
    fn meta(&self, name: &StateName, ttl: Option<&StateTtlConfig>) -> StateMeta {
        meta_of(
            name,
            StateKind::Reducing,
            ttl,
            vec![
                (SerializerRole::Namespace, self.ns.snapshot()),
                (SerializerRole::Value, self.ser.snapshot()),
            ],
        )
    }
    fn transcoder(
        &self,
        name: &StateName,
        meta: &StateMeta,
        stamp: Option<i64>,
        lists: (ListEncoding, ListEncoding),
    ) -> Result<Option<Box<dyn Transcoder>>> {
        Ok(GenericTranscoder {
            name: name.clone(),
            layout: Layout::Single,
            ns: Box::new(Recode::namespace(name, meta, &self.ns)?),
            user_key: None,
            value: Box::new(Recode::new(
                name,
                meta,
                SerializerRole::Value,
                &self.ser,
                "value",
            )?),
            stamp,
            lists,
        }
        .boxed())
    }
    fn merge_values(&self, name: &StateName, a: &[u8], b: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let a = self.ser.deserialize(a).map_err(de_err(name, "value"))?;
        let b = self.ser.deserialize(b).map_err(de_err(name, "value"))?;
        self.ser
            .serialize(&(self.reduce)(a, b), out)
            .map_err(ser_err(name, "value"))
    }
}

impl<IN: 'static, ACC: StateType, OUT: 'static, N: Namespace> TypedState
    for AggregatingT<IN, ACC, OUT, N>
{
    common!(StateKind::Aggregating);
    fn meta(&self, name: &StateName, ttl: Option<&StateTtlConfig>) -> StateMeta {
        meta_of(
            name,
            StateKind::Aggregating,
            ttl,
            vec![
                (SerializerRole::Namespace, self.ns.snapshot()),
                (SerializerRole::Value, self.ser.snapshot()),
            ],
        )
    }
    fn transcoder(
        &self,
        name: &StateName,
        meta: &StateMeta,
        stamp: Option<i64>,
        lists: (ListEncoding, ListEncoding),
    ) -> Result<Option<Box<dyn Transcoder>>> {
        Ok(GenericTranscoder {
            name: name.clone(),
            layout: Layout::Single,
            ns: Box::new(Recode::namespace(name, meta, &self.ns)?),
            user_key: None,
            value: Box::new(Recode::new(
                name,
                meta,
                SerializerRole::Value,
                &self.ser,
                "value",
            )?),
            stamp,
            lists,
        }
        .boxed())
    }
    fn merge_values(&self, name: &StateName, a: &[u8], b: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let a = self
            .ser
            .deserialize(a)
            .map_err(de_err(name, "accumulator"))?;
        let b = self
            .ser
            .deserialize(b)
            .map_err(de_err(name, "accumulator"))?;
        self.ser
            .serialize(&self.func.merge(a, b), out)
            .map_err(ser_err(name, "accumulator"))
    }
    fn aggregate_result(
        &self,
        name: &StateName,
        acc: Option<&[u8]>,
        out: &mut dyn Any,
    ) -> Result<()> {
        let out = out
            .downcast_mut::<Option<OUT>>()
            .ok_or_else(|| Error::StateTypeMismatch {
                state: name.to_string(),
                reason: "the output type differs from the registered one".into(),
            })?;
        *out = match acc {
            Some(b) => {
                let acc = self
                    .ser
                    .deserialize(b)
                    .map_err(de_err(name, "accumulator"))?;
                Some(self.func.get_result(&acc))
            }
            None => None,
        };
        Ok(())
    }
    fn aggregate_add(
        &self,
        name: &StateName,
        acc: Option<&[u8]>,
        value: &mut dyn Any,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let value = value
            .downcast_mut::<Option<IN>>()
            .and_then(Option::take)
            .ok_or_else(|| Error::StateTypeMismatch {
                state: name.to_string(),
                reason: "the input type differs from the registered one".into(),
            })?;
        let acc = match acc {
            Some(b) => self
                .ser
                .deserialize(b)
                .map_err(de_err(name, "accumulator"))?,
            None => self.func.create_accumulator(),
        };
        self.ser
            .serialize(&self.func.add(value, acc), out)
            .map_err(ser_err(name, "accumulator"))
    }
}

/// Timer service types: only the namespace serializer.
pub(crate) struct TimerT<N> {
    pub ns: Arc<dyn StateSerializer<N>>,
    pub meta: StateMeta,
}

impl<N: Namespace> TypedState for TimerT<N> {
    common!(StateKind::Timers);
    fn meta(&self, _name: &StateName, _ttl: Option<&StateTtlConfig>) -> StateMeta {
        self.meta.clone()
    }
    fn transcoder(
        &self,
        name: &StateName,
        meta: &StateMeta,
        _stamp: Option<i64>,
        lists: (ListEncoding, ListEncoding),
    ) -> Result<Option<Box<dyn Transcoder>>> {
        Ok(GenericTranscoder {
            name: name.clone(),
            layout: Layout::Timer,
            ns: Box::new(Recode::namespace(name, meta, &self.ns)?),
            user_key: None,
            value: Box::new(Same),
            stamp: None,
            lists,
        }
        .boxed())
    }
}
