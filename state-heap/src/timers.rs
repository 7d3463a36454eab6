//! Timer services of the heap backend: timers kept serialized in key-group-partitioned ordered
//! sets (state-api's `KeyGroupTimers`), shared copy-on-write with running snapshots.

use std::any::{Any, TypeId};
use std::sync::Arc;

use state_api::snapshot::Decoder;
use state_api::timer::decode_timer_payload;
use state_api::{
    Error, KeyGroupRange, KeyGroupTimers, Namespace, Result, SerializerRole, StateMeta, StateName,
    StateSerializer, TimerServiceDescriptor,
};

use crate::PendingChunk;

/// Re-encodes the namespaces of restored timers for the current namespace serializer.
type NamespaceRestorer = Box<dyn Fn(&StateMeta, &[u8]) -> Result<Vec<u8>> + Send>;

/// One registered timer service, with its namespace type erased.
pub(crate) struct TimerService {
    pub name: StateName,
    pub meta: StateMeta,
    pub ns_type: TypeId,
    /// An `Arc<dyn StateSerializer<N>>`.
    pub ns_serializer: Box<dyn Any + Send>,
    pub timers: KeyGroupTimers,
    restore_ns: NamespaceRestorer,
}

impl TimerService {
    pub fn new<N: Namespace>(d: &TimerServiceDescriptor<N>, range: KeyGroupRange) -> Self {
        let ser = Arc::clone(d.namespace_serializer());
        let name = d.name().clone();
        let restorer_ser = Arc::clone(&ser);
        let restorer_name = name.clone();
        let restore_ns: NamespaceRestorer = Box::new(move |meta, bytes| {
            let reader = meta.reader_for(SerializerRole::Namespace, &restorer_ser)?;
            if !reader.is_migration() {
                return Ok(bytes.to_vec());
            }
            let de = |e: state_api::SerdeError| Error::Deserialize {
                state: restorer_name.to_string(),
                what: "namespace",
                reason: e.0,
            };
            let ns = reader.read(bytes).map_err(de)?;
            let mut out = Vec::new();
            restorer_ser
                .serialize(&ns, &mut out)
                .map_err(|e| Error::Serialize {
                    state: restorer_name.to_string(),
                    what: "namespace",
                    reason: e.0,
                })?;
            Ok(out)
        });
        TimerService {
            meta: d.meta(),
            name,
            ns_type: TypeId::of::<N>(),
            ns_serializer: Box::new(ser),
            timers: KeyGroupTimers::new(range),
            restore_ns,
        }
    }

    pub fn serializer<N: Namespace>(&self) -> Result<&Arc<dyn StateSerializer<N>>> {
        self.ns_serializer
            .downcast_ref::<Arc<dyn StateSerializer<N>>>()
            .ok_or_else(|| Error::StateTypeMismatch {
                state: self.name.to_string(),
                reason: "the namespace type differs from the registered one".into(),
            })
    }

    /// Loads restored timer records (all or nothing).
    pub fn restore(&mut self, chunk: &PendingChunk) -> Result<()> {
        let mut decoded = Vec::new();
        for r in chunk.records() {
            let (key_group, r) = r?;
            let mut d = Decoder::new(r.payload, r.payload_offset, &chunk.stream);
            let (ts, domain) = decode_timer_payload(&mut d)?;
            let ns = (self.restore_ns)(&chunk.meta, r.namespace)?;
            decoded.push((domain, key_group, (ts, r.key.to_vec(), ns)));
        }
        for (domain, kg, t) in decoded {
            self.timers.register(domain, kg, t)?;
        }
        Ok(())
    }
}
