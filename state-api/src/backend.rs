//! The keyed state backend trait, state handles, and the accessors users call.
//!
//! A backend is created for one subtask (one [`KeyGroupRange`]). States are registered once
//! from their descriptors and give back typed handles. Each record sets the current key with
//! [`KeyedStateBackend::set_current_key`]; the accessors of [`KeyedStateBackendExt`] then read
//! and write the state of that key in the default namespace `()` (or a given namespace):
//!
//! ```
//! # use state_api::*;
//! # fn demo<B: KeyedStateBackend<Key = String>>(backend: &mut B) -> Result<()> {
//! let count = backend.register_value(ValueStateDescriptor::<u64>::new("count")?)?;
//! backend.set_current_key("alice".to_string())?;
//! let next = backend.value(&count).get()?.unwrap_or(0) + 1;
//! backend.value(&count).update(next)?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::io::{Read, Write};
use std::marker::PhantomData;

use crate::descriptor::*;
use crate::error::Result;
use crate::key_group::KeyGroupRange;
use crate::snapshot::SnapshotSummary;
use crate::timer::{TimeDomain, Timer, TimerAccess, TimerServiceDescriptor, TimerServiceHandle};

/// A backend-assigned state number, unique within one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StateId(pub u32);

macro_rules! handle {
    ($(#[$doc:meta])* $name:ident < $($p:ident),* >, $kind:expr) => {
        $(#[$doc])*
        pub struct $name<$($p),*> {
            id: StateId,
            name: StateName,
            _types: PhantomData<fn() -> ($($p,)*)>,
        }

        impl<$($p),*> $name<$($p),*> {
            /// Made by backends when a state is registered.
            pub fn new(id: StateId, name: StateName) -> Self {
                $name { id, name, _types: PhantomData }
            }
            /// The backend's number for the state.
            pub fn id(&self) -> StateId {
                self.id
            }
            /// The state's name.
            pub fn name(&self) -> &StateName {
                &self.name
            }
            /// The state's kind.
            pub fn kind(&self) -> StateKind {
                $kind
            }
        }

        impl<$($p),*> Clone for $name<$($p),*> {
            fn clone(&self) -> Self {
                $name { id: self.id, name: self.name.clone(), _types: PhantomData }
            }
        }

        impl<$($p),*> fmt::Debug for $name<$($p),*> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?}, {:?})", stringify!($name), self.id, self.name)
            }
        }
    };
}

handle!(
    /// A registered value state.
    ValueStateHandle<V, N>, StateKind::Value);
handle!(
    /// A registered list state.
    ListStateHandle<T, N>, StateKind::List);
handle!(
    /// A registered map state.
    MapStateHandle<UK, UV, N>, StateKind::Map);
handle!(
    /// A registered reducing state.
    ReducingStateHandle<T, N>, StateKind::Reducing);
handle!(
    /// A registered aggregating state.
    AggregatingStateHandle<IN, OUT, N>, StateKind::Aggregating);

/// What every handle tells a backend: which state, and its namespace type.
pub trait StateHandle<N> {
    /// The backend's number for the state.
    fn state_id(&self) -> StateId;
    /// The state's name.
    fn state_name(&self) -> &StateName;
}

/// Handles of states whose namespaces can be merged (list, reducing, aggregating).
pub trait MergeableHandle<N>: StateHandle<N> {}

macro_rules! impl_state_handle {
    ($name:ident < $($p:ident),* >, $n:ident) => {
        impl<$($p),*> StateHandle<$n> for $name<$($p),*> {
            fn state_id(&self) -> StateId {
                self.id
            }
            fn state_name(&self) -> &StateName {
                &self.name
            }
        }
    };
}
impl_state_handle!(ValueStateHandle<V, N>, N);
impl_state_handle!(ListStateHandle<T, N>, N);
impl_state_handle!(MapStateHandle<UK, UV, N>, N);
impl_state_handle!(ReducingStateHandle<T, N>, N);
impl_state_handle!(AggregatingStateHandle<IN, OUT, N>, N);
impl<T, N> MergeableHandle<N> for ListStateHandle<T, N> {}
impl<T, N> MergeableHandle<N> for ReducingStateHandle<T, N> {}
impl<IN, OUT, N> MergeableHandle<N> for AggregatingStateHandle<IN, OUT, N> {}

/// The synchronous result of [`KeyedStateBackend::snapshot`]: a consistent view of the state that
/// can be written (the slow part) on another thread while processing continues.
pub trait KeyedStateSnapshot: Send {
    /// Writes the view as a canonical snapshot stream (see [`crate::snapshot`]).
    fn write_to(&self, out: &mut dyn Write) -> Result<SnapshotSummary>;
    /// The key groups the snapshot covers.
    fn key_group_range(&self) -> KeyGroupRange;
}

/// The keys of a state, one at a time ([`KeyedStateBackend::keys`]); an item is an error when a
/// key cannot be read (a damaged file, a key that does not deserialize).
pub type KeyIter<'a, K> = Box<dyn Iterator<Item = Result<K>> + 'a>;

/// The entries of a map state, one at a time ([`KeyedStateBackend::map_entries`]); an item is
/// an error when an entry cannot be read.
pub type MapIter<'a, UK, UV> = Box<dyn Iterator<Item = Result<(UK, UV)>> + 'a>;

/// Keyed state storage for one subtask: the primitive operations every backend provides.
///
/// Users normally go through the accessors of [`KeyedStateBackendExt`]. Semantics follow
/// Flink's: reading absent state gives `None`, `clear` removes the entry, an empty list is
/// "absent", and updating a list with `[]` clears it. All operations act on the current key.
pub trait KeyedStateBackend: Send {
    /// The key type.
    type Key: StateKey;

    /// The number of key groups of the job.
    fn max_parallelism(&self) -> u32;
    /// The key groups this backend owns.
    fn key_group_range(&self) -> KeyGroupRange;
    /// Sets the key that following state accesses act on. Fails if the key's key group is not
    /// in this backend's range.
    fn set_current_key(&mut self, key: Self::Key) -> Result<()>;
    /// The current key.
    fn current_key(&self) -> Option<&Self::Key>;
    /// The key group of the current key.
    fn current_key_group(&self) -> Option<u32>;

    /// Registers (or re-obtains) a value state. Restored data for the name is checked against
    /// the descriptor's serializers here.
    fn register_value<V: StateType, N: Namespace>(
        &mut self,
        descriptor: ValueStateDescriptor<V, N>,
    ) -> Result<ValueStateHandle<V, N>>;
    /// Registers (or re-obtains) a list state.
    fn register_list<T: StateType, N: Namespace>(
        &mut self,
        descriptor: ListStateDescriptor<T, N>,
    ) -> Result<ListStateHandle<T, N>>;
    /// Registers (or re-obtains) a map state.
    fn register_map<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        descriptor: MapStateDescriptor<UK, UV, N>,
    ) -> Result<MapStateHandle<UK, UV, N>>;
    /// Registers (or re-obtains) a reducing state.
    fn register_reducing<T: StateType, N: Namespace>(
        &mut self,
        descriptor: ReducingStateDescriptor<T, N>,
    ) -> Result<ReducingStateHandle<T, N>>;
    /// Registers (or re-obtains) an aggregating state.
    fn register_aggregating<IN: 'static, ACC: StateType, OUT: 'static, N: Namespace>(
        &mut self,
        descriptor: AggregatingStateDescriptor<IN, ACC, OUT, N>,
    ) -> Result<AggregatingStateHandle<IN, OUT, N>>;

    /// A value state bound to this backend for a run of records, as a Flink `ValueState` object
    /// is bound to its state table: the state is found once here, not on every access. Its
    /// [`BoundValueState::set_current_key`] sets the backend's current key, as
    /// [`KeyedStateBackend::set_current_key`] does. Backends without a faster path return
    /// [`GenericBoundValue`] (with [`generic_bound_value!`](crate::generic_bound_value)).
    type BoundValue<'a, V: StateType, N: Namespace>: BoundValueState<Self::Key, V, N>
    where
        Self: 'a;

    /// Binds value state `h` in namespace `ns` for a run of records (see
    /// [`KeyedStateBackend::BoundValue`]). Fails, here or at the first access, if `h` is not a
    /// value state of this backend.
    ///
    /// ```
    /// # use state_api::*;
    /// # fn count<B: KeyedStateBackend<Key = u64>>(
    /// #     b: &mut B,
    /// #     h: &ValueStateHandle<u64, ()>,
    /// #     keys: &[u64],
    /// # ) -> Result<()> {
    /// let mut counts = b.bind_value(h, ())?;
    /// for &k in keys {
    ///     counts.set_current_key(k)?;
    ///     let n = counts.get()?.unwrap_or(0);
    ///     counts.update(n + 1)?;
    /// }
    /// # Ok(()) }
    /// ```
    fn bind_value<V: StateType, N: Namespace>(
        &mut self,
        h: &ValueStateHandle<V, N>,
        ns: N,
    ) -> Result<Self::BoundValue<'_, V, N>>;

    /// The value, or the descriptor's default, or `None`.
    fn value_get<V: StateType, N: Namespace>(
        &mut self,
        h: &ValueStateHandle<V, N>,
        ns: &N,
    ) -> Result<Option<V>>;
    /// Sets the value.
    fn value_update<V: StateType, N: Namespace>(
        &mut self,
        h: &ValueStateHandle<V, N>,
        ns: &N,
        value: V,
    ) -> Result<()>;

    /// The list, or `None` when empty or absent.
    fn list_get<T: StateType, N: Namespace>(
        &mut self,
        h: &ListStateHandle<T, N>,
        ns: &N,
    ) -> Result<Option<Vec<T>>>;
    /// Appends one element.
    fn list_add<T: StateType, N: Namespace>(
        &mut self,
        h: &ListStateHandle<T, N>,
        ns: &N,
        value: T,
    ) -> Result<()>;
    /// Appends elements (nothing happens for an empty vector).
    fn list_add_all<T: StateType, N: Namespace>(
        &mut self,
        h: &ListStateHandle<T, N>,
        ns: &N,
        values: Vec<T>,
    ) -> Result<()>;
    /// Replaces the list; an empty vector clears it.
    fn list_update<T: StateType, N: Namespace>(
        &mut self,
        h: &ListStateHandle<T, N>,
        ns: &N,
        values: Vec<T>,
    ) -> Result<()>;

    /// The value of `user_key`.
    fn map_get<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
        user_key: &UK,
    ) -> Result<Option<UV>>;
    /// Sets the value of `user_key`.
    fn map_put<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
        user_key: UK,
        value: UV,
    ) -> Result<()>;
    /// Sets several entries.
    fn map_put_all<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
        entries: Vec<(UK, UV)>,
    ) -> Result<()>;
    /// Removes `user_key`; the map disappears when its last entry goes.
    fn map_remove<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
        user_key: &UK,
    ) -> Result<()>;
    /// True when `user_key` has a (visible) value.
    fn map_contains<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
        user_key: &UK,
    ) -> Result<bool>;
    /// Every visible entry, in the backend's order, produced as the iterator is advanced (on
    /// the mmap backend a map without TTL streams from the engine). The iterator borrows the
    /// backend; collect it to write while going through the entries.
    fn map_entries<'a, UK: MapKey, UV: StateType, N: Namespace>(
        &'a mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
    ) -> Result<MapIter<'a, UK, UV>>;
    /// True when the map has no visible entry.
    fn map_is_empty<UK: MapKey, UV: StateType, N: Namespace>(
        &mut self,
        h: &MapStateHandle<UK, UV, N>,
        ns: &N,
    ) -> Result<bool>;

    /// The reduced value.
    fn reducing_get<T: StateType, N: Namespace>(
        &mut self,
        h: &ReducingStateHandle<T, N>,
        ns: &N,
    ) -> Result<Option<T>>;
    /// Folds `value` into the state.
    fn reducing_add<T: StateType, N: Namespace>(
        &mut self,
        h: &ReducingStateHandle<T, N>,
        ns: &N,
        value: T,
    ) -> Result<()>;

    /// The aggregate's result, or `None` when nothing was added.
    fn aggregating_get<IN: 'static, OUT: 'static, N: Namespace>(
        &mut self,
        h: &AggregatingStateHandle<IN, OUT, N>,
        ns: &N,
    ) -> Result<Option<OUT>>;
    /// Adds `value` to the accumulator.
    fn aggregating_add<IN: 'static, OUT: 'static, N: Namespace>(
        &mut self,
        h: &AggregatingStateHandle<IN, OUT, N>,
        ns: &N,
        value: IN,
    ) -> Result<()>;

    /// Removes the state of the current key in `ns`.
    fn clear<N: Namespace>(&mut self, h: &dyn StateHandle<N>, ns: &N) -> Result<()>;

    /// Merges the state of the current key in `sources` into `target` and clears the sources
    /// (merging windows). Lists are concatenated; reducing and aggregating states are combined
    /// with their functions.
    fn merge_namespaces<N: Namespace>(
        &mut self,
        h: &dyn MergeableHandle<N>,
        target: &N,
        sources: &[N],
    ) -> Result<()>;

    /// Every key with state in `ns` for this state (Flink's `getKeys`), in no particular order,
    /// produced as the iterator is advanced: on the mmap backend the keys stream from the
    /// engine, so iterating a state larger than memory keeps memory flat.
    ///
    /// The iterator borrows the backend: a caller that wants to `set_current_key` (or write)
    /// while going through the keys collects them first
    /// (`backend.keys(h, ns)?.collect::<Result<Vec<_>>>()?`), as in Flink, where changing
    /// state while iterating `getKeys` is not supported either.
    fn keys<'a, N: Namespace>(
        &'a mut self,
        h: &dyn StateHandle<N>,
        ns: &N,
    ) -> Result<KeyIter<'a, Self::Key>>;

    /// Registers (or re-obtains) a timer service; restored timers of that name are checked and
    /// loaded here.
    fn register_timer_service<N: Namespace>(
        &mut self,
        descriptor: TimerServiceDescriptor<N>,
    ) -> Result<TimerServiceHandle<N>>;

    /// Registers a timer for the current key in `ns` (a no-op if the same timer exists).
    fn register_timer<N: Namespace>(
        &mut self,
        h: &TimerServiceHandle<N>,
        domain: TimeDomain,
        ns: &N,
        timestamp: i64,
    ) -> Result<()>;

    /// Deletes a timer of the current key in `ns` (a no-op if there is none).
    fn delete_timer<N: Namespace>(
        &mut self,
        h: &TimerServiceHandle<N>,
        domain: TimeDomain,
        ns: &N,
        timestamp: i64,
    ) -> Result<()>;

    /// Advances the watermark (event time) or the processing time to `time`: removes and returns
    /// every timer of that domain with a timestamp at or before `time`, in timestamp order, for
    /// all keys of this backend.
    fn advance_time<N: Namespace>(
        &mut self,
        h: &TimerServiceHandle<N>,
        domain: TimeDomain,
        time: i64,
    ) -> Result<Vec<Timer<Self::Key, N>>>;

    /// Removes and returns the earliest timer of `domain` with a timestamp at or before `time`
    /// (`None` when nothing is due): the lazy form of [`KeyedStateBackend::advance_time`], for
    /// any number of due timers in constant memory.
    ///
    /// Timers come in timestamp order; among timers with the same timestamp the order is the
    /// backend's (by key group, then key and namespace bytes, on both built-in backends), as in
    /// Flink, where ties are ordered by its key-group priority queue. Between two calls the
    /// caller may use state and register or delete timers: a timer registered at or before
    /// `time` fires in the same loop, as Flink fires timers registered by a timer callback
    /// while it advances the watermark.
    ///
    /// ```
    /// # use state_api::*;
    /// # fn fire<B: KeyedStateBackend<Key = String>>(
    /// #     b: &mut B,
    /// #     h: &TimerServiceHandle<()>,
    /// #     count: &ValueStateHandle<u64, ()>,
    /// # ) -> Result<()> {
    /// while let Some(t) = b.next_due_timer(h, TimeDomain::EventTime, 1_000)? {
    ///     b.set_current_key(t.key)?;
    ///     b.value(count).clear()?;
    /// }
    /// # Ok(()) }
    /// ```
    fn next_due_timer<N: Namespace>(
        &mut self,
        h: &TimerServiceHandle<N>,
        domain: TimeDomain,
        time: i64,
    ) -> Result<Option<Timer<Self::Key, N>>>;

    /// Captures a consistent view of every state. This is the short synchronous part of a
    /// checkpoint; write the returned snapshot with [`KeyedStateSnapshot::write_to`], possibly on
    /// another thread, while processing continues.
    fn snapshot(&mut self) -> Result<Box<dyn KeyedStateSnapshot>>;

    /// Restores from one or several canonical snapshot streams `(name, reader)`, keeping the key
    /// groups of this backend's range. Registered states are checked and filled at once; others
    /// when they are registered. Records are applied as the streams are read, so after an
    /// error registered states may be partly filled: discard the backend and build a new one
    /// (as a Flink task restarts with a fresh backend after a failed restore).
    fn restore<R: Read>(&mut self, streams: Vec<(String, R)>) -> Result<()>;
}

/// Typed accessors over the primitive operations; implemented for every backend.
pub trait KeyedStateBackendExt: KeyedStateBackend + Sized {
    /// The value state of the current key in the default namespace.
    fn value<'a, V: StateType>(
        &'a mut self,
        h: &'a ValueStateHandle<V, ()>,
    ) -> ValueState<'a, Self, V, ()> {
        ValueState {
            b: self,
            h,
            ns: &(),
        }
    }
    /// The value state of the current key in `ns`.
    fn value_in<'a, V: StateType, N: Namespace>(
        &'a mut self,
        h: &'a ValueStateHandle<V, N>,
        ns: &'a N,
    ) -> ValueState<'a, Self, V, N> {
        ValueState { b: self, h, ns }
    }
    /// The list state of the current key in the default namespace.
    fn list<'a, T: StateType>(
        &'a mut self,
        h: &'a ListStateHandle<T, ()>,
    ) -> ListState<'a, Self, T, ()> {
        ListState {
            b: self,
            h,
            ns: &(),
        }
    }
    /// The list state of the current key in `ns`.
    fn list_in<'a, T: StateType, N: Namespace>(
        &'a mut self,
        h: &'a ListStateHandle<T, N>,
        ns: &'a N,
    ) -> ListState<'a, Self, T, N> {
        ListState { b: self, h, ns }
    }
    /// The map state of the current key in the default namespace.
    fn map<'a, UK: MapKey, UV: StateType>(
        &'a mut self,
        h: &'a MapStateHandle<UK, UV, ()>,
    ) -> MapState<'a, Self, UK, UV, ()> {
        MapState {
            b: self,
            h,
            ns: &(),
        }
    }
    /// The map state of the current key in `ns`.
    fn map_in<'a, UK: MapKey, UV: StateType, N: Namespace>(
        &'a mut self,
        h: &'a MapStateHandle<UK, UV, N>,
        ns: &'a N,
    ) -> MapState<'a, Self, UK, UV, N> {
        MapState { b: self, h, ns }
    }
    /// The reducing state of the current key in the default namespace.
    fn reducing<'a, T: StateType>(
        &'a mut self,
        h: &'a ReducingStateHandle<T, ()>,
    ) -> ReducingState<'a, Self, T, ()> {
        ReducingState {
            b: self,
            h,
            ns: &(),
        }
    }
    /// The reducing state of the current key in `ns`.
    fn reducing_in<'a, T: StateType, N: Namespace>(
        &'a mut self,
        h: &'a ReducingStateHandle<T, N>,
        ns: &'a N,
    ) -> ReducingState<'a, Self, T, N> {
        ReducingState { b: self, h, ns }
    }
    /// The aggregating state of the current key in the default namespace.
    fn aggregating<'a, IN: 'static, OUT: 'static>(
        &'a mut self,
        h: &'a AggregatingStateHandle<IN, OUT, ()>,
    ) -> AggregatingState<'a, Self, IN, OUT, ()> {
        AggregatingState {
            b: self,
            h,
            ns: &(),
        }
    }
    /// The aggregating state of the current key in `ns`.
    fn aggregating_in<'a, IN: 'static, OUT: 'static, N: Namespace>(
        &'a mut self,
        h: &'a AggregatingStateHandle<IN, OUT, N>,
        ns: &'a N,
    ) -> AggregatingState<'a, Self, IN, OUT, N> {
        AggregatingState { b: self, h, ns }
    }

    /// The timers of the current key for a timer service.
    fn timers<'a, N: Namespace>(
        &'a mut self,
        h: &'a TimerServiceHandle<N>,
    ) -> TimerAccess<'a, Self, N> {
        TimerAccess { b: self, h }
    }

    /// Advances the watermark to `watermark`: the due event-time timers, in timestamp order.
    fn advance_watermark<N: Namespace>(
        &mut self,
        h: &TimerServiceHandle<N>,
        watermark: i64,
    ) -> Result<Vec<Timer<Self::Key, N>>> {
        self.advance_time(h, TimeDomain::EventTime, watermark)
    }

    /// Advances the processing time to `now`: the due processing-time timers, in timestamp order.
    fn advance_processing_time<N: Namespace>(
        &mut self,
        h: &TimerServiceHandle<N>,
        now: i64,
    ) -> Result<Vec<Timer<Self::Key, N>>> {
        self.advance_time(h, TimeDomain::ProcessingTime, now)
    }
}

impl<B: KeyedStateBackend> KeyedStateBackendExt for B {}

/// Value state of the current key in one namespace.
pub struct ValueState<'a, B, V, N> {
    b: &'a mut B,
    h: &'a ValueStateHandle<V, N>,
    ns: &'a N,
}

impl<B: KeyedStateBackend, V: StateType, N: Namespace> ValueState<'_, B, V, N> {
    /// The value (or the descriptor's default), `None` when absent.
    pub fn get(&mut self) -> Result<Option<V>> {
        self.b.value_get(self.h, self.ns)
    }
    /// Sets the value.
    pub fn update(&mut self, value: V) -> Result<()> {
        self.b.value_update(self.h, self.ns, value)
    }
    /// Removes the value.
    pub fn clear(&mut self) -> Result<()> {
        self.b.clear(self.h, self.ns)
    }
}

/// A value state bound to its backend for a run of records: see
/// [`KeyedStateBackend::bind_value`]. Semantics are those of [`ValueState`]; the bound state
/// also sets the current key and the namespace it acts on.
pub trait BoundValueState<K, V, N> {
    /// Sets the backend's current key (as [`KeyedStateBackend::set_current_key`]).
    fn set_current_key(&mut self, key: K) -> Result<()>;
    /// Sets the namespace the following accesses act on.
    fn set_namespace(&mut self, ns: N);
    /// The value of the current key (or the descriptor's default), `None` when absent.
    fn get(&mut self) -> Result<Option<V>>;
    /// Sets the value of the current key.
    fn update(&mut self, value: V) -> Result<()>;
    /// Removes the value of the current key.
    fn clear(&mut self) -> Result<()>;
}

/// A bound value state made of a backend's primitive operations (for backends without a faster
/// path of their own).
pub struct GenericBoundValue<'a, B, V, N> {
    b: &'a mut B,
    h: ValueStateHandle<V, N>,
    ns: N,
}

impl<'a, B, V, N> GenericBoundValue<'a, B, V, N> {
    /// Binds `h` in `ns` of backend `b`.
    pub fn new(b: &'a mut B, h: &ValueStateHandle<V, N>, ns: N) -> Self {
        GenericBoundValue {
            b,
            h: h.clone(),
            ns,
        }
    }
}

impl<B, V, N> fmt::Debug for GenericBoundValue<'_, B, V, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenericBoundValue")
            .field("state", &self.h)
            .finish_non_exhaustive()
    }
}

impl<B: KeyedStateBackend, V: StateType, N: Namespace> BoundValueState<B::Key, V, N>
    for GenericBoundValue<'_, B, V, N>
{
    fn set_current_key(&mut self, key: B::Key) -> Result<()> {
        self.b.set_current_key(key)
    }
    fn set_namespace(&mut self, ns: N) {
        self.ns = ns;
    }
    fn get(&mut self) -> Result<Option<V>> {
        self.b.value_get(&self.h, &self.ns)
    }
    fn update(&mut self, value: V) -> Result<()> {
        self.b.value_update(&self.h, &self.ns, value)
    }
    fn clear(&mut self) -> Result<()> {
        self.b.clear(&self.h, &self.ns)
    }
}

/// Implements [`KeyedStateBackend::BoundValue`] and [`KeyedStateBackend::bind_value`] with
/// [`GenericBoundValue`]: write `state_api::generic_bound_value!();` inside the
/// `impl KeyedStateBackend for ...` block of a backend without a faster path of its own (stable
/// Rust has no defaults for associated types yet).
#[macro_export]
macro_rules! generic_bound_value {
    () => {
        type BoundValue<'a, V: $crate::StateType, N: $crate::Namespace>
            = $crate::GenericBoundValue<'a, Self, V, N>
        where
            Self: 'a;

        fn bind_value<V: $crate::StateType, N: $crate::Namespace>(
            &mut self,
            h: &$crate::ValueStateHandle<V, N>,
            ns: N,
        ) -> $crate::Result<Self::BoundValue<'_, V, N>> {
            Ok($crate::GenericBoundValue::new(self, h, ns))
        }
    };
}

/// List state of the current key in one namespace.
pub struct ListState<'a, B, T, N> {
    b: &'a mut B,
    h: &'a ListStateHandle<T, N>,
    ns: &'a N,
}

impl<B: KeyedStateBackend, T: StateType, N: Namespace> ListState<'_, B, T, N> {
    /// The elements, `None` when the list is empty or absent.
    pub fn get(&mut self) -> Result<Option<Vec<T>>> {
        self.b.list_get(self.h, self.ns)
    }
    /// Appends one element.
    pub fn add(&mut self, value: T) -> Result<()> {
        self.b.list_add(self.h, self.ns, value)
    }
    /// Appends several elements.
    pub fn add_all(&mut self, values: Vec<T>) -> Result<()> {
        self.b.list_add_all(self.h, self.ns, values)
    }
    /// Replaces the list (`[]` clears it).
    pub fn update(&mut self, values: Vec<T>) -> Result<()> {
        self.b.list_update(self.h, self.ns, values)
    }
    /// Removes the list.
    pub fn clear(&mut self) -> Result<()> {
        self.b.clear(self.h, self.ns)
    }
}

/// Map state of the current key in one namespace.
pub struct MapState<'a, B, UK, UV, N> {
    b: &'a mut B,
    h: &'a MapStateHandle<UK, UV, N>,
    ns: &'a N,
}

impl<B: KeyedStateBackend, UK: MapKey, UV: StateType, N: Namespace> MapState<'_, B, UK, UV, N> {
    /// The value of `user_key`.
    pub fn get(&mut self, user_key: &UK) -> Result<Option<UV>> {
        self.b.map_get(self.h, self.ns, user_key)
    }
    /// Sets the value of `user_key`.
    pub fn put(&mut self, user_key: UK, value: UV) -> Result<()> {
        self.b.map_put(self.h, self.ns, user_key, value)
    }
    /// Sets several entries.
    pub fn put_all(&mut self, entries: Vec<(UK, UV)>) -> Result<()> {
        self.b.map_put_all(self.h, self.ns, entries)
    }
    /// Removes `user_key`.
    pub fn remove(&mut self, user_key: &UK) -> Result<()> {
        self.b.map_remove(self.h, self.ns, user_key)
    }
    /// True when `user_key` has a value.
    pub fn contains(&mut self, user_key: &UK) -> Result<bool> {
        self.b.map_contains(self.h, self.ns, user_key)
    }
    /// Every entry, as the iterator is advanced (collect it with
    /// `.collect::<Result<Vec<_>>>()`).
    pub fn iter(&mut self) -> Result<MapIter<'_, UK, UV>> {
        self.b.map_entries(self.h, self.ns)
    }
    /// Every user key, as the iterator is advanced.
    pub fn keys(&mut self) -> Result<impl Iterator<Item = Result<UK>> + '_> {
        Ok(self.iter()?.map(|e| e.map(|(k, _)| k)))
    }
    /// Every user value, as the iterator is advanced.
    pub fn values(&mut self) -> Result<impl Iterator<Item = Result<UV>> + '_> {
        Ok(self.iter()?.map(|e| e.map(|(_, v)| v)))
    }
    /// True when the map has no entry.
    pub fn is_empty(&mut self) -> Result<bool> {
        self.b.map_is_empty(self.h, self.ns)
    }
    /// Removes the whole map.
    pub fn clear(&mut self) -> Result<()> {
        self.b.clear(self.h, self.ns)
    }
}

/// Reducing state of the current key in one namespace.
pub struct ReducingState<'a, B, T, N> {
    b: &'a mut B,
    h: &'a ReducingStateHandle<T, N>,
    ns: &'a N,
}

impl<B: KeyedStateBackend, T: StateType, N: Namespace> ReducingState<'_, B, T, N> {
    /// The reduced value.
    pub fn get(&mut self) -> Result<Option<T>> {
        self.b.reducing_get(self.h, self.ns)
    }
    /// Folds `value` in.
    pub fn add(&mut self, value: T) -> Result<()> {
        self.b.reducing_add(self.h, self.ns, value)
    }
    /// Removes the value.
    pub fn clear(&mut self) -> Result<()> {
        self.b.clear(self.h, self.ns)
    }
    /// Merges `sources` into this namespace.
    pub fn merge_namespaces(&mut self, sources: &[N]) -> Result<()> {
        self.b.merge_namespaces(self.h, self.ns, sources)
    }
}

/// Aggregating state of the current key in one namespace.
pub struct AggregatingState<'a, B, IN, OUT, N> {
    b: &'a mut B,
    h: &'a AggregatingStateHandle<IN, OUT, N>,
    ns: &'a N,
}

impl<B: KeyedStateBackend, IN: 'static, OUT: 'static, N: Namespace>
    AggregatingState<'_, B, IN, OUT, N>
{
    /// The result of the accumulator.
    pub fn get(&mut self) -> Result<Option<OUT>> {
        self.b.aggregating_get(self.h, self.ns)
    }
    /// Adds `value` to the accumulator.
    pub fn add(&mut self, value: IN) -> Result<()> {
        self.b.aggregating_add(self.h, self.ns, value)
    }
    /// Removes the accumulator.
    pub fn clear(&mut self) -> Result<()> {
        self.b.clear(self.h, self.ns)
    }
    /// Merges `sources` into this namespace.
    pub fn merge_namespaces(&mut self, sources: &[N]) -> Result<()> {
        self.b.merge_namespaces(self.h, self.ns, sources)
    }
}

impl<B: KeyedStateBackend, T: StateType, N: Namespace> ListState<'_, B, T, N> {
    /// Merges `sources` into this namespace.
    pub fn merge_namespaces(&mut self, sources: &[N]) -> Result<()> {
        self.b.merge_namespaces(self.h, self.ns, sources)
    }
}
