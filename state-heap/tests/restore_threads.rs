//! Restore with any number of decoding threads gives the same state: streams apply in order
//! (a later stream's record of a key replaces an earlier one's), registered states and states
//! registered after the restore alike; a wrong type is refused without losing the data.
#![allow(clippy::unwrap_used)]

use state_api::*;
use state_heap::HeapKeyedStateBackend;

fn backend(threads: usize) -> HeapKeyedStateBackend<u64> {
    HeapKeyedStateBackend::<u64>::builder()
        .key_serializer(FixedWidthSerializer::<u64>::new())
        .restore_threads(threads)
        .build()
        .unwrap()
}

fn values() -> ValueStateDescriptor<u64> {
    ValueStateDescriptor::<u64>::new("v").unwrap()
}

fn lists() -> ListStateDescriptor<String> {
    ListStateDescriptor::<String>::new("l").unwrap()
}

/// Two snapshots of the same keys: the second has other values for the even keys and lacks
/// the odd ones.
fn streams() -> (Vec<u8>, Vec<u8>) {
    let mut b = backend(1);
    let v = b.register_value(values()).unwrap();
    let l = b.register_list(lists()).unwrap();
    for k in 0..3_000u64 {
        b.set_current_key(k).unwrap();
        b.value(&v).update(k).unwrap();
        b.list(&l).add(format!("first {k}")).unwrap();
    }
    let mut first = Vec::new();
    b.snapshot().unwrap().write_to(&mut first).unwrap();
    let mut b = backend(1);
    let v = b.register_value(values()).unwrap();
    let l = b.register_list(lists()).unwrap();
    for k in (0..3_000u64).step_by(2) {
        b.set_current_key(k).unwrap();
        b.value(&v).update(k * 10).unwrap();
        b.list(&l).add(format!("second {k}")).unwrap();
    }
    let mut second = Vec::new();
    b.snapshot().unwrap().write_to(&mut second).unwrap();
    (first, second)
}

fn check(b: &mut HeapKeyedStateBackend<u64>) {
    let v = b.register_value(values()).unwrap();
    let l = b.register_list(lists()).unwrap();
    for k in 0..3_000u64 {
        b.set_current_key(k).unwrap();
        let (value, list) = if k % 2 == 0 {
            (k * 10, format!("second {k}"))
        } else {
            (k, format!("first {k}"))
        };
        assert_eq!(b.value(&v).get().unwrap(), Some(value), "value of key {k}");
        assert_eq!(
            b.list(&l).get().unwrap(),
            Some(vec![list]),
            "list of key {k}"
        );
    }
    assert_eq!(b.num_entries(), 6_000);
}

#[test]
fn any_number_of_threads_restores_the_same_state_in_stream_order() {
    let (first, second) = streams();
    for threads in [1, 2, 3, 7] {
        // Registered before the restore: decoded as the streams are read.
        let mut b = backend(threads);
        b.register_value(values()).unwrap();
        b.register_list(lists()).unwrap();
        b.restore(vec![
            ("first".to_string(), &first[..]),
            ("second".to_string(), &second[..]),
        ])
        .unwrap();
        check(&mut b);
        // Registered after: kept, then decoded at registration.
        let mut b = backend(threads);
        b.restore(vec![
            ("first".to_string(), &first[..]),
            ("second".to_string(), &second[..]),
        ])
        .unwrap();
        check(&mut b);
        // One registered before, one after.
        let mut b = backend(threads);
        b.register_value(values()).unwrap();
        b.restore(vec![
            ("first".to_string(), &first[..]),
            ("second".to_string(), &second[..]),
        ])
        .unwrap();
        assert_eq!(
            b.pending_restored_states(),
            vec![StateName::new("l").unwrap()]
        );
        check(&mut b);
    }
}

#[test]
fn a_wrong_type_is_refused_and_the_restored_data_stays() {
    let (first, _) = streams();
    for threads in [1, 2] {
        let mut b = backend(threads);
        b.restore(vec![("first".to_string(), &first[..])]).unwrap();
        // The list holds Strings: reading them as u64 fails, and nothing is lost.
        let err = b
            .register_list(ListStateDescriptor::<u64>::new("l").unwrap())
            .unwrap_err();
        assert!(err.to_string().contains('l'), "{err}");
        let l = b.register_list(lists()).unwrap();
        b.set_current_key(7).unwrap();
        assert_eq!(b.list(&l).get().unwrap(), Some(vec!["first 7".to_string()]));
        // Registered first with the wrong type: the restore itself fails.
        let mut b = backend(threads);
        b.register_list(ListStateDescriptor::<u64>::new("l").unwrap())
            .unwrap();
        assert!(b.restore(vec![("first".to_string(), &first[..])]).is_err());
    }
}
