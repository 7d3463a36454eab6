//! State descriptors: a state's name, kind, serializers, TTL and defaults.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::serializer::{PostcardSerializer, SerializerSnapshot, StateSerializer};
use crate::ttl::StateTtlConfig;

/// Longest state name accepted, in bytes.
pub const MAX_STATE_NAME_LEN: usize = 255;

/// What every value kept in state must be: cheap to share between the processing thread and an
/// asynchronous snapshot.
pub trait StateType: Clone + Send + Sync + 'static {}
impl<T: Clone + Send + Sync + 'static> StateType for T {}

/// A key of keyed state. Its key group comes from its serialized bytes, not from `Hash`.
pub trait StateKey: StateType + Eq {}
impl<T: StateType + Eq> StateKey for T {}

/// A namespace (e.g. a window). `()` is the default, "no namespace".
pub trait Namespace: StateType + Eq + Hash {}
impl<T: StateType + Eq + Hash> Namespace for T {}

/// A user key of map state.
pub trait MapKey: StateType + Eq + Hash {}
impl<T: StateType + Eq + Hash> MapKey for T {}

/// A validated state name: non-empty, at most 255 bytes, no path separators, no control
/// characters, not `.` or `..`. Safe to use as part of a file or object name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StateName(Arc<str>);

impl StateName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self> {
        let bad = |reason| {
            Err(Error::InvalidStateName {
                name: name.to_string(),
                reason,
            })
        };
        if name.is_empty() {
            return bad("the name is empty");
        }
        if name.len() > MAX_STATE_NAME_LEN {
            return bad("the name is longer than 255 bytes");
        }
        if name.contains(['/', '\\']) {
            return bad("the name contains a path separator");
        }
        if name.chars().any(char::is_control) {
            return bad("the name contains a control character");
        }
        if name == "." || name == ".." {
            return bad("the name is a relative path component");
        }
        Ok(StateName(Arc::from(name)))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// The five kinds of keyed state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StateKind {
    /// One value per (key, namespace).
    Value,
    /// A list per (key, namespace).
    List,
    /// A map per (key, namespace).
    Map,
    /// A value folded with a reduce function.
    Reducing,
    /// An accumulator fed by an aggregate function.
    Aggregating,
    /// The timers of a timer service (see [`crate::timer`]).
    Timers,
}

impl StateKind {
    /// The byte that stands for this kind in snapshots.
    pub fn code(self) -> u8 {
        match self {
            StateKind::Value => 1,
            StateKind::List => 2,
            StateKind::Map => 3,
            StateKind::Reducing => 4,
            StateKind::Aggregating => 5,
            StateKind::Timers => 6,
        }
    }

    /// The kind of a snapshot byte.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => StateKind::Value,
            2 => StateKind::List,
            3 => StateKind::Map,
            4 => StateKind::Reducing,
            5 => StateKind::Aggregating,
            6 => StateKind::Timers,
            _ => return None,
        })
    }

    /// True for kinds whose namespaces can be merged (list, reducing, aggregating).
    pub fn is_mergeable(self) -> bool {
        matches!(
            self,
            StateKind::List | StateKind::Reducing | StateKind::Aggregating
        )
    }
}

impl fmt::Display for StateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StateKind::Value => "value",
            StateKind::List => "list",
            StateKind::Map => "map",
            StateKind::Reducing => "reducing",
            StateKind::Aggregating => "aggregating",
            StateKind::Timers => "timers",
        })
    }
}

/// The role a serializer plays in a state; snapshots store one serializer snapshot per role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SerializerRole {
    /// The namespace.
    Namespace,
    /// The value (value state), element (list state), value or accumulator (reducing, aggregating).
    Value,
    /// The user key of map state.
    UserKey,
    /// The user value of map state.
    UserValue,
}

impl SerializerRole {
    /// The byte that stands for this role in snapshots.
    pub fn code(self) -> u8 {
        match self {
            SerializerRole::Namespace => 1,
            SerializerRole::Value => 2,
            SerializerRole::UserKey => 3,
            SerializerRole::UserValue => 4,
        }
    }

    /// The role of a snapshot byte.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => SerializerRole::Namespace,
            2 => SerializerRole::Value,
            3 => SerializerRole::UserKey,
            4 => SerializerRole::UserValue,
            _ => return None,
        })
    }

    /// A human name for error messages.
    pub fn name(self) -> &'static str {
        match self {
            SerializerRole::Namespace => "namespace",
            SerializerRole::Value => "value",
            SerializerRole::UserKey => "map user key",
            SerializerRole::UserValue => "map user value",
        }
    }
}

/// What a snapshot records about a state: everything except the Rust types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateMeta {
    /// The state's name.
    pub name: StateName,
    /// The state's kind.
    pub kind: StateKind,
    /// The TTL in milliseconds, if the state had TTL.
    pub ttl_millis: Option<i64>,
    /// One serializer snapshot per role.
    pub serializers: Vec<(SerializerRole, SerializerSnapshot)>,
}

impl StateMeta {
    /// The serializer snapshot of `role`.
    pub fn serializer(&self, role: SerializerRole) -> Option<&SerializerSnapshot> {
        self.serializers
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, s)| s)
    }

    /// How `current` reads the bytes this snapshot wrote for `role`: as is or through a
    /// migration, or an [`Error::IncompatibleSerializer`] naming the state and the role.
    pub fn reader_for<T: 'static>(
        &self,
        role: SerializerRole,
        current: &Arc<dyn StateSerializer<T>>,
    ) -> Result<crate::serializer::ResolvedReader<T>> {
        let incompatible = |reason: String| Error::IncompatibleSerializer {
            state: self.name.to_string(),
            what: role.name(),
            reason,
        };
        let previous = self
            .serializer(role)
            .ok_or_else(|| incompatible("the snapshot records no serializer for it".into()))?;
        crate::serializer::resolve_reader(current, previous).map_err(incompatible)
    }
}

/// A reduce function: folds two values into one.
pub type ReduceFn<T> = Arc<dyn Fn(T, T) -> T + Send + Sync>;

/// An aggregate function over an accumulator (Flink's `AggregateFunction`).
pub trait AggregateFunction<IN, ACC, OUT>: Send + Sync + 'static {
    /// A new, empty accumulator.
    fn create_accumulator(&self) -> ACC;
    /// Adds `value` to `acc`.
    fn add(&self, value: IN, acc: ACC) -> ACC;
    /// The result of an accumulator.
    fn get_result(&self, acc: &ACC) -> OUT;
    /// Merges two accumulators (used when namespaces are merged).
    fn merge(&self, a: ACC, b: ACC) -> ACC;
}

fn postcard<T: Serialize + DeserializeOwned + 'static>() -> Arc<dyn StateSerializer<T>> {
    Arc::new(PostcardSerializer::<T>::new())
}

macro_rules! common_descriptor_methods {
    () => {
        /// The state's name.
        pub fn name(&self) -> &StateName {
            &self.name
        }

        /// The TTL configuration, if any.
        pub fn ttl(&self) -> Option<&StateTtlConfig> {
            self.ttl.as_ref()
        }

        /// Gives the state a time-to-live.
        pub fn with_ttl(mut self, ttl: StateTtlConfig) -> Self {
            self.ttl = Some(ttl);
            self
        }

        /// Uses `serializer` for the namespace instead of postcard.
        pub fn with_namespace_serializer(
            mut self,
            serializer: impl StateSerializer<N> + 'static,
        ) -> Self {
            self.namespace_serializer = Arc::new(serializer);
            self
        }

        /// The namespace serializer.
        pub fn namespace_serializer(&self) -> &Arc<dyn StateSerializer<N>> {
            &self.namespace_serializer
        }
    };
}

/// Declares a [`StateKind::Value`] state holding a `V` per (key, namespace `N`).
#[derive(Clone)]
pub struct ValueStateDescriptor<V, N = ()> {
    name: StateName,
    ttl: Option<StateTtlConfig>,
    namespace_serializer: Arc<dyn StateSerializer<N>>,
    value_serializer: Arc<dyn StateSerializer<V>>,
    default: Option<V>,
}

impl<V, N> ValueStateDescriptor<V, N>
where
    V: StateType + Serialize + DeserializeOwned,
    N: Namespace + Serialize + DeserializeOwned,
{
    /// A value state with postcard serializers.
    pub fn new(name: &str) -> Result<Self> {
        Ok(ValueStateDescriptor {
            name: StateName::new(name)?,
            ttl: None,
            namespace_serializer: postcard::<N>(),
            value_serializer: postcard::<V>(),
            default: None,
        })
    }
}

impl<V: StateType, N: Namespace> ValueStateDescriptor<V, N> {
    common_descriptor_methods!();

    /// Uses `serializer` for values.
    pub fn with_value_serializer(mut self, serializer: impl StateSerializer<V> + 'static) -> Self {
        self.value_serializer = Arc::new(serializer);
        self
    }

    /// The value returned when no value is set (Flink's deprecated default value).
    pub fn with_default(mut self, default: V) -> Self {
        self.default = Some(default);
        self
    }

    /// The value serializer.
    pub fn value_serializer(&self) -> &Arc<dyn StateSerializer<V>> {
        &self.value_serializer
    }

    /// The default value, if any.
    pub fn default_value(&self) -> Option<&V> {
        self.default.as_ref()
    }

    /// What snapshots record about this state.
    pub fn meta(&self) -> StateMeta {
        StateMeta {
            name: self.name.clone(),
            kind: StateKind::Value,
            ttl_millis: self.ttl.map(|t| t.ttl_millis()),
            serializers: vec![
                (
                    SerializerRole::Namespace,
                    self.namespace_serializer.snapshot(),
                ),
                (SerializerRole::Value, self.value_serializer.snapshot()),
            ],
        }
    }
}

/// Declares a [`StateKind::List`] state holding a list of `T` per (key, namespace `N`).
#[derive(Clone)]
pub struct ListStateDescriptor<T, N = ()> {
    name: StateName,
    ttl: Option<StateTtlConfig>,
    namespace_serializer: Arc<dyn StateSerializer<N>>,
    element_serializer: Arc<dyn StateSerializer<T>>,
}

impl<T, N> ListStateDescriptor<T, N>
where
    T: StateType + Serialize + DeserializeOwned,
    N: Namespace + Serialize + DeserializeOwned,
{
    /// A list state with postcard serializers.
    pub fn new(name: &str) -> Result<Self> {
        Ok(ListStateDescriptor {
            name: StateName::new(name)?,
            ttl: None,
            namespace_serializer: postcard::<N>(),
            element_serializer: postcard::<T>(),
        })
    }
}

impl<T: StateType, N: Namespace> ListStateDescriptor<T, N> {
    common_descriptor_methods!();

    /// Uses `serializer` for list elements.
    pub fn with_element_serializer(
        mut self,
        serializer: impl StateSerializer<T> + 'static,
    ) -> Self {
        self.element_serializer = Arc::new(serializer);
        self
    }

    /// The element serializer.
    pub fn element_serializer(&self) -> &Arc<dyn StateSerializer<T>> {
        &self.element_serializer
    }

    /// What snapshots record about this state.
    pub fn meta(&self) -> StateMeta {
        StateMeta {
            name: self.name.clone(),
            kind: StateKind::List,
            ttl_millis: self.ttl.map(|t| t.ttl_millis()),
            serializers: vec![
                (
                    SerializerRole::Namespace,
                    self.namespace_serializer.snapshot(),
                ),
                (SerializerRole::Value, self.element_serializer.snapshot()),
            ],
        }
    }
}

/// Declares a [`StateKind::Map`] state holding a map `UK -> UV` per (key, namespace `N`).
#[derive(Clone)]
pub struct MapStateDescriptor<UK, UV, N = ()> {
    name: StateName,
    ttl: Option<StateTtlConfig>,
    namespace_serializer: Arc<dyn StateSerializer<N>>,
    user_key_serializer: Arc<dyn StateSerializer<UK>>,
    user_value_serializer: Arc<dyn StateSerializer<UV>>,
}

impl<UK, UV, N> MapStateDescriptor<UK, UV, N>
where
    UK: MapKey + Serialize + DeserializeOwned,
    UV: StateType + Serialize + DeserializeOwned,
    N: Namespace + Serialize + DeserializeOwned,
{
    /// A map state with postcard serializers.
    pub fn new(name: &str) -> Result<Self> {
        Ok(MapStateDescriptor {
            name: StateName::new(name)?,
            ttl: None,
            namespace_serializer: postcard::<N>(),
            user_key_serializer: postcard::<UK>(),
            user_value_serializer: postcard::<UV>(),
        })
    }
}

impl<UK: MapKey, UV: StateType, N: Namespace> MapStateDescriptor<UK, UV, N> {
    common_descriptor_methods!();

    /// Uses `serializer` for user keys.
    pub fn with_user_key_serializer(
        mut self,
        serializer: impl StateSerializer<UK> + 'static,
    ) -> Self {
        self.user_key_serializer = Arc::new(serializer);
        self
    }

    /// Uses `serializer` for user values.
    pub fn with_user_value_serializer(
        mut self,
        serializer: impl StateSerializer<UV> + 'static,
    ) -> Self {
        self.user_value_serializer = Arc::new(serializer);
        self
    }

    /// The user key serializer.
    pub fn user_key_serializer(&self) -> &Arc<dyn StateSerializer<UK>> {
        &self.user_key_serializer
    }

    /// The user value serializer.
    pub fn user_value_serializer(&self) -> &Arc<dyn StateSerializer<UV>> {
        &self.user_value_serializer
    }

    /// What snapshots record about this state.
    pub fn meta(&self) -> StateMeta {
        StateMeta {
            name: self.name.clone(),
            kind: StateKind::Map,
            ttl_millis: self.ttl.map(|t| t.ttl_millis()),
            serializers: vec![
                (
                    SerializerRole::Namespace,
                    self.namespace_serializer.snapshot(),
                ),
                (SerializerRole::UserKey, self.user_key_serializer.snapshot()),
                (
                    SerializerRole::UserValue,
                    self.user_value_serializer.snapshot(),
                ),
            ],
        }
    }
}

/// Declares a [`StateKind::Reducing`] state: values added are folded with a reduce function.
#[derive(Clone)]
pub struct ReducingStateDescriptor<T, N = ()> {
    name: StateName,
    ttl: Option<StateTtlConfig>,
    namespace_serializer: Arc<dyn StateSerializer<N>>,
    value_serializer: Arc<dyn StateSerializer<T>>,
    reduce: ReduceFn<T>,
}

impl<T, N> ReducingStateDescriptor<T, N>
where
    T: StateType + Serialize + DeserializeOwned,
    N: Namespace + Serialize + DeserializeOwned,
{
    /// A reducing state with postcard serializers.
    pub fn new(name: &str, reduce: impl Fn(T, T) -> T + Send + Sync + 'static) -> Result<Self> {
        Ok(ReducingStateDescriptor {
            name: StateName::new(name)?,
            ttl: None,
            namespace_serializer: postcard::<N>(),
            value_serializer: postcard::<T>(),
            reduce: Arc::new(reduce),
        })
    }
}

impl<T: StateType, N: Namespace> ReducingStateDescriptor<T, N> {
    common_descriptor_methods!();

    /// Uses `serializer` for the reduced value.
    pub fn with_value_serializer(mut self, serializer: impl StateSerializer<T> + 'static) -> Self {
        self.value_serializer = Arc::new(serializer);
        self
    }

    /// The value serializer.
    pub fn value_serializer(&self) -> &Arc<dyn StateSerializer<T>> {
        &self.value_serializer
    }

    /// The reduce function.
    pub fn reduce_fn(&self) -> &ReduceFn<T> {
        &self.reduce
    }

    /// What snapshots record about this state.
    pub fn meta(&self) -> StateMeta {
        StateMeta {
            name: self.name.clone(),
            kind: StateKind::Reducing,
            ttl_millis: self.ttl.map(|t| t.ttl_millis()),
            serializers: vec![
                (
                    SerializerRole::Namespace,
                    self.namespace_serializer.snapshot(),
                ),
                (SerializerRole::Value, self.value_serializer.snapshot()),
            ],
        }
    }
}

/// Declares a [`StateKind::Aggregating`] state: inputs `IN` are added to an accumulator `ACC`,
/// reads return `OUT`.
pub struct AggregatingStateDescriptor<IN, ACC, OUT, N = ()> {
    name: StateName,
    ttl: Option<StateTtlConfig>,
    namespace_serializer: Arc<dyn StateSerializer<N>>,
    accumulator_serializer: Arc<dyn StateSerializer<ACC>>,
    function: Arc<dyn AggregateFunction<IN, ACC, OUT>>,
}

impl<IN, ACC, OUT, N> Clone for AggregatingStateDescriptor<IN, ACC, OUT, N> {
    fn clone(&self) -> Self {
        AggregatingStateDescriptor {
            name: self.name.clone(),
            ttl: self.ttl,
            namespace_serializer: Arc::clone(&self.namespace_serializer),
            accumulator_serializer: Arc::clone(&self.accumulator_serializer),
            function: Arc::clone(&self.function),
        }
    }
}

impl<IN, ACC, OUT, N> AggregatingStateDescriptor<IN, ACC, OUT, N>
where
    IN: 'static,
    OUT: 'static,
    ACC: StateType + Serialize + DeserializeOwned,
    N: Namespace + Serialize + DeserializeOwned,
{
    /// An aggregating state with postcard serializers.
    pub fn new(name: &str, function: impl AggregateFunction<IN, ACC, OUT>) -> Result<Self> {
        Ok(AggregatingStateDescriptor {
            name: StateName::new(name)?,
            ttl: None,
            namespace_serializer: postcard::<N>(),
            accumulator_serializer: postcard::<ACC>(),
            function: Arc::new(function),
        })
    }
}

impl<IN: 'static, ACC: StateType, OUT: 'static, N: Namespace>
    AggregatingStateDescriptor<IN, ACC, OUT, N>
{
    common_descriptor_methods!();

    /// Uses `serializer` for the accumulator.
    pub fn with_accumulator_serializer(
        mut self,
        serializer: impl StateSerializer<ACC> + 'static,
    ) -> Self {
        self.accumulator_serializer = Arc::new(serializer);
        self
    }

    /// The accumulator serializer.
    pub fn accumulator_serializer(&self) -> &Arc<dyn StateSerializer<ACC>> {
        &self.accumulator_serializer
    }

    /// The aggregate function.
    pub fn function(&self) -> &Arc<dyn AggregateFunction<IN, ACC, OUT>> {
        &self.function
    }

    /// What snapshots record about this state.
    pub fn meta(&self) -> StateMeta {
        StateMeta {
            name: self.name.clone(),
            kind: StateKind::Aggregating,
            ttl_millis: self.ttl.map(|t| t.ttl_millis()),
            serializers: vec![
                (
                    SerializerRole::Namespace,
                    self.namespace_serializer.snapshot(),
                ),
                (
                    SerializerRole::Value,
                    self.accumulator_serializer.snapshot(),
                ),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_are_validated() {
        for bad in ["", "a/b", "a\\b", "a\nb", "..", ".", &"x".repeat(256)] {
            let err = StateName::new(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidStateName { .. }), "{bad:?}");
        }
        for good in ["count", "window-sums.v2", "ünïcode", &"x".repeat(255)] {
            assert_eq!(StateName::new(good).unwrap().as_str(), good);
        }
        assert!(ValueStateDescriptor::<u64>::new("a/b").is_err());
    }

    #[test]
    fn kinds_and_roles_round_trip_codes() {
        for k in [
            StateKind::Value,
            StateKind::List,
            StateKind::Map,
            StateKind::Reducing,
            StateKind::Aggregating,
            StateKind::Timers,
        ] {
            assert_eq!(StateKind::from_code(k.code()), Some(k));
        }
        assert_eq!(StateKind::from_code(0), None);
        for r in [
            SerializerRole::Namespace,
            SerializerRole::Value,
            SerializerRole::UserKey,
            SerializerRole::UserValue,
        ] {
            assert_eq!(SerializerRole::from_code(r.code()), Some(r));
        }
    }
}
