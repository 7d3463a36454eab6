//! `flowstate state dump --format parquet` (feature `parquet`): the file reads back with the
//! Parquet reader, row for row the entries of the JSON Lines dump.
#![cfg(feature = "parquet")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use arrow_array::{Array, Int64Array, StringArray, UInt32Array};
use checkpoint::processor::SavepointWriter;
use common::*;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use state_api::{ListStateDescriptor, PostcardSerializer, ValueStateDescriptor};

#[test]
fn parquet_dump_reads_back_as_the_json_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let config = flowstate::config::ConfigLoader::new().load().unwrap();
    let root = format!("file://{}", tmp.path().join("sp").display());
    let storage = flowstate_cli::job::open_storage(&config, &root, "shop").unwrap();
    // A bootstrapped savepoint of a job the CLI does not know.
    let keys = PostcardSerializer::<u64>::new();
    let mut w = SavepointWriter::new();
    w.add_operator("carts", 128, 2).unwrap();
    w.write_value(
        "carts",
        &keys,
        &ValueStateDescriptor::<String>::new("owner").unwrap(),
        (0..300u64).map(|k| (k, (), format!("customer-{k}"))),
    )
    .unwrap();
    w.write_list(
        "carts",
        &keys,
        &ListStateDescriptor::<u32>::new("items").unwrap(),
        (0..100u64).map(|k| (k, (), vec![k as u32, 7])),
    )
    .unwrap();
    let sp = w.write(&storage, "shop-1").unwrap().dir_location();

    let out = tmp.path().join("state.parquet");
    ok(&[
        "state",
        "dump",
        &sp,
        "--format",
        "parquet",
        "-o",
        out.to_str().unwrap(),
    ]);
    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&out).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let mut rows = BTreeSet::new();
    for batch in reader {
        let b = batch.unwrap();
        let s = |name: &str| {
            b.column_by_name(name)
                .unwrap()
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap()
                .clone()
        };
        let (state, key, value) = (s("state"), s("key"), s("value"));
        let kg = b
            .column_by_name("key_group")
            .unwrap()
            .as_any()
            .downcast_ref::<UInt32Array>()
            .unwrap()
            .clone();
        let ttl = b
            .column_by_name("ttl_timestamp")
            .unwrap()
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .clone();
        for i in 0..b.num_rows() {
            assert!(ttl.is_null(i));
            rows.insert((
                state.value(i).to_string(),
                kg.value(i),
                key.value(i).to_string(),
                value.value(i).to_string(),
            ));
        }
    }
    assert_eq!(rows.len(), 400);
    // The same entries as the JSON Lines dump.
    let jsonl: BTreeSet<(String, u32, String, String)> = ok(&["state", "dump", &sp])
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["state"].as_str().unwrap().to_string(),
                v["key_group"].as_u64().unwrap() as u32,
                v["key"].to_string(),
                v["value"].to_string(),
            )
        })
        .collect();
    assert_eq!(rows, jsonl);
    assert!(rows
        .iter()
        .any(|r| r.0 == "items" && r.2 == "5" && r.3 == "[5,7]"));
    assert!(rows
        .iter()
        .any(|r| r.0 == "owner" && r.2 == "7" && r.3 == "\"customer-7\""));
}
