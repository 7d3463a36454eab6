/*
 * Flowstate's comparison with Apache Flink (benches/flink-compare): Flink's own keyed state
 * backends (HashMapStateBackend's heap backend, EmbeddedRocksDBStateBackend's RocksDB backend),
 * created directly as flink-benchmarks' state benchmarks create them, running the workloads of
 * benches/peer-bench with flink-benchmarks' constants. Written for this repository; see
 * README.md next to it for the method and its caveats.
 *
 *   workloads KEYS ROUNDS BACKENDS   (BACKENDS: hashmap,rocksdb)
 *   checkpoint KEYS VALUE_BYTES BACKEND DIR   (BACKEND: hashmap or rocksdb)
 *   rescale KEYS VALUE_BYTES BACKEND DIR      (BACKEND: rocksdb, or rocksdb-ingest for Flink's
 *                                              ingest-DB restore mode)
 *
 * Prints human lines and one machine-readable line per figure:
 *   RESULT <backend> <workload> <value>       (ops/s of wall time, or seconds / MB)
 *   RESULT_CPU <backend> <workload> <ops/s>   (ops per second of the process's CPU time)
 */
package flowstate;

import org.apache.flink.api.common.ExecutionConfig;
import org.apache.flink.api.common.state.ListState;
import org.apache.flink.api.common.state.ListStateDescriptor;
import org.apache.flink.api.common.state.MapState;
import org.apache.flink.api.common.state.MapStateDescriptor;
import org.apache.flink.api.common.state.State;
import org.apache.flink.api.common.state.StateDescriptor;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.common.typeutils.base.LongSerializer;
import org.apache.flink.api.common.typeutils.base.array.BytePrimitiveArraySerializer;
import org.apache.flink.core.fs.CloseableRegistry;
import org.apache.flink.core.fs.FileSystem;
import org.apache.flink.core.fs.Path;
import org.apache.flink.runtime.checkpoint.CheckpointOptions;
import org.apache.flink.runtime.state.AbstractKeyedStateBackend;
import org.apache.flink.runtime.state.KeyGroupRange;
import org.apache.flink.runtime.state.KeyGroupRangeAssignment;
import org.apache.flink.runtime.state.KeyedStateHandle;
import org.apache.flink.runtime.state.LocalRecoveryConfig;
import org.apache.flink.runtime.state.SharedStateRegistry;
import org.apache.flink.runtime.state.SharedStateRegistryImpl;
import org.apache.flink.runtime.state.SnapshotResult;
import org.apache.flink.runtime.state.UncompressedStreamCompressionDecorator;
import org.apache.flink.runtime.state.VoidNamespace;
import org.apache.flink.runtime.state.VoidNamespaceSerializer;
import org.apache.flink.runtime.state.filesystem.FsCheckpointStreamFactory;
import org.apache.flink.runtime.state.heap.HeapKeyedStateBackendBuilder;
import org.apache.flink.runtime.state.heap.HeapPriorityQueueSetFactory;
import org.apache.flink.runtime.state.metrics.LatencyTrackingStateConfig;
import org.apache.flink.runtime.state.metrics.SizeTrackingStateConfig;
import org.apache.flink.runtime.state.ttl.TtlTimeProvider;
import org.apache.flink.state.rocksdb.FlowstateRocksAccess;
import org.apache.flink.state.rocksdb.RocksDBKeyedStateBackend;

import java.io.File;
import java.io.IOException;
import java.lang.management.ManagementFactory;
import java.lang.management.ThreadMXBean;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collection;
import java.util.Collections;
import java.util.Comparator;
import java.util.HashMap;
import java.util.Iterator;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.RunnableFuture;
import java.util.stream.Stream;

public final class FlinkStateBench {
    /** flink-benchmarks' StateBenchmarkConstants: 10 map entries per key, 100-element add_all. */
    static final int MAP_ENTRIES = 10;
    static final int ADD_ALL = 100;
    /** Flink's default max parallelism for a job of parallelism 1 is 128 key groups. */
    static final int MAX_PARALLELISM = 128;
    /** Managed memory given to the RocksDB backend: the 256 MiB budget of our mmap backend. */
    static final long ROCKSDB_MANAGED_BYTES = 256L << 20;

    static volatile long sink;

    static final ThreadMXBean THREADS = ManagementFactory.getThreadMXBean();

    public static void main(String[] args) throws Exception {
        if (args.length >= 1 && args[0].equals("workloads")) {
            long n = args.length > 1 ? Long.parseLong(args[1]) : 500_000;
            int rounds = args.length > 2 ? Integer.parseInt(args[2]) : 3;
            String backends = args.length > 3 ? args[3] : "hashmap,rocksdb";
            File tmp = Files.createTempDirectory("flink-compare").toFile();
            try {
                for (String b : backends.split(",")) {
                    workloads(b, n, rounds, tmp);
                }
            } finally {
                deleteRecursively(tmp);
            }
        } else if (args.length == 5 && args[0].equals("checkpoint")) {
            checkpoint(
                    args[3],
                    Long.parseLong(args[1]),
                    Integer.parseInt(args[2]),
                    new File(args[4]));
        } else if (args.length == 5 && args[0].equals("rescale")) {
            rescale(
                    args[3],
                    Long.parseLong(args[1]),
                    Integer.parseInt(args[2]),
                    new File(args[4]));
        } else {
            System.err.println(
                    "usage: workloads [KEYS] [ROUNDS] [hashmap,rocksdb] | checkpoint KEYS VALUE_BYTES hashmap|rocksdb DIR"
                            + " | rescale KEYS VALUE_BYTES rocksdb|rocksdb-ingest DIR");
            System.exit(2);
        }
        System.exit(0);
    }

    // ------------------------------------------------------------------ backends

    static AbstractKeyedStateBackend<Long> heap(
            KeyGroupRange range, Collection<KeyedStateHandle> restore) throws Exception {
        return new HeapKeyedStateBackendBuilder<Long>(
                        null,
                        LongSerializer.INSTANCE,
                        FlinkStateBench.class.getClassLoader(),
                        MAX_PARALLELISM,
                        range,
                        new ExecutionConfig(),
                        TtlTimeProvider.DEFAULT,
                        LatencyTrackingStateConfig.disabled(),
                        SizeTrackingStateConfig.disabled(),
                        restore,
                        UncompressedStreamCompressionDecorator.INSTANCE,
                        LocalRecoveryConfig.BACKUP_AND_RECOVERY_DISABLED,
                        new HeapPriorityQueueSetFactory(range, MAX_PARALLELISM, 128),
                        true,
                        new CloseableRegistry())
                .build();
    }

    static AbstractKeyedStateBackend<Long> create(
            String which,
            File dir,
            boolean incremental,
            Collection<KeyedStateHandle> restore,
            ExecutorService io)
            throws Exception {
        KeyGroupRange all = KeyGroupRange.of(0, MAX_PARALLELISM - 1);
        switch (which) {
            case "hashmap":
                return heap(all, restore);
            case "rocksdb":
                return FlowstateRocksAccess.build(
                        dir,
                        LongSerializer.INSTANCE,
                        MAX_PARALLELISM,
                        all,
                        ROCKSDB_MANAGED_BYTES,
                        incremental,
                        restore,
                        io,
                        false);
            default:
                throw new IllegalArgumentException("unknown backend '" + which + "' (hashmap or rocksdb)");
        }
    }

    static <S extends State> S state(AbstractKeyedStateBackend<Long> b, StateDescriptor<S, ?> d)
            throws Exception {
        return b.getPartitionedState(VoidNamespace.INSTANCE, VoidNamespaceSerializer.INSTANCE, d);
    }

    // ------------------------------------------------------------------ workloads

    /** The same permutation as benches/peer-bench's `shuffled` (xorshift, Fisher-Yates). */
    static long[] shuffled(long n, long seed) {
        long[] v = new long[(int) n];
        for (int i = 0; i < n; i++) {
            v[i] = i;
        }
        long s = seed | 1;
        for (int i = v.length - 1; i >= 1; i--) {
            s ^= s << 13;
            s ^= s >>> 7;
            s ^= s << 17;
            int j = (int) Long.remainderUnsigned(s, i + 1L);
            long t = v[i];
            v[i] = v[j];
            v[j] = t;
        }
        return v;
    }

    interface Body {
        void run() throws Exception;
    }

    /** Per workload: ops/s of wall time, one entry per measured round. */
    static final class Figures {
        final Map<String, List<Double>> wall = new LinkedHashMap<>();
        final Map<String, List<Double>> cpu = new LinkedHashMap<>();
        final Map<String, List<Double>> processCpu = new LinkedHashMap<>();
        boolean record = true;

        void time(String name, long ops, Body body) throws Exception {
            long c = THREADS.getCurrentThreadCpuTime();
            double pc = processCpuSeconds();
            long t = System.nanoTime();
            body.run();
            double s = (System.nanoTime() - t) / 1e9;
            double cs = (THREADS.getCurrentThreadCpuTime() - c) / 1e9;
            double pcs = processCpuSeconds() - pc;
            if (record) {
                wall.computeIfAbsent(name, k -> new ArrayList<>()).add(ops / s);
                cpu.computeIfAbsent(name, k -> new ArrayList<>()).add(ops / cs);
                processCpu.computeIfAbsent(name, k -> new ArrayList<>()).add(ops / pcs);
            }
        }

        static double median(List<Double> v) {
            List<Double> s = new ArrayList<>(v);
            s.sort(Comparator.naturalOrder());
            return s.get(s.size() / 2);
        }
    }

    static final String[] WORKLOADS = {
        "no-op (set key)",
        "value get",
        "value update",
        "value add",
        "list add",
        "list append",
        "list get",
        "list add_all(100)",
        "map get",
        "map contains",
        "map iterate(10)",
        "map put",
    };

    static String token(String workload) {
        return workload.replaceAll("\\(.*\\)", "").trim().replace(' ', '_').replace("-", "");
    }

    static void workloads(String which, long n, int rounds, File tmp) throws Exception {
        Figures figs = new Figures();
        ExecutorService io = Executors.newFixedThreadPool(4);
        // Round 0 warms the JIT up (the same code paths, a fresh backend) and is not recorded.
        for (int round = 0; round <= rounds; round++) {
            figs.record = round > 0;
            File dir = new File(tmp, which + "-" + round);
            AbstractKeyedStateBackend<Long> b = create(which, dir, false, Collections.emptyList(), io);
            try {
                runWorkloads(figs, b, n, 0x5eed + Math.max(round - 1, 0));
            } finally {
                b.dispose();
                deleteRecursively(dir);
            }
            System.gc();
            System.err.printf("flink %s: round %d of %d done%s%n", which, round, rounds, round == 0 ? " (warm-up)" : "");
        }
        io.shutdownNow();
        String backend = "flink-" + which;
        System.out.printf("Flink %s, %d keys, median of %d rounds after a warm-up round (ops/s of wall time; thread CPU: per second of the benchmark thread's CPU time; process CPU: per second of all the JVM's threads' CPU time, GC, JIT and RocksDB's included)%n", which, n, rounds);
        for (String w : WORKLOADS) {
            double wall = Figures.median(figs.wall.get(w));
            double cpu = Figures.median(figs.cpu.get(w));
            double pcpu = Figures.median(figs.processCpu.get(w));
            System.out.printf("  %-20s %12.0f   thread CPU %12.0f   process CPU %12.0f%n", w, wall, cpu, pcpu);
            System.out.printf("RESULT %s %s %.0f%n", backend, token(w), wall);
            System.out.printf("RESULT_CPU %s %s %.0f%n", backend, token(w), pcpu);
        }
        // Framework cost per operation: what setCurrentKey alone costs (ns).
        double noop = Figures.median(figs.wall.get("no-op (set key)"));
        System.out.printf("  setCurrentKey alone: %.1f ns per op%n", 1e9 / noop);
    }

    static void settle(AbstractKeyedStateBackend<Long> b, StateDescriptor<?, ?> compact) throws Exception {
        if (b instanceof RocksDBKeyedStateBackend) {
            RocksDBKeyedStateBackend<Long> r = (RocksDBKeyedStateBackend<Long>) b;
            if (compact != null) {
                r.compactState(compact);
            }
            FlowstateRocksAccess.waitIdle(r);
        }
    }

    /**
     * The workload sequence of benches/peer-bench's run_backend, on Flink's API: setup of n keys
     * (a value, a one-element list, a 10-entry map each), then each workload over the n keys in a
     * shuffled order; read workloads on a settled store (RocksDB: no flush or compaction running,
     * and its list state compacted before the list get, as flink-benchmarks' ListStateBenchmark
     * does).
     */
    static void runWorkloads(Figures figs, AbstractKeyedStateBackend<Long> b, long n, long seed)
            throws Exception {
        ValueStateDescriptor<Long> vd = new ValueStateDescriptor<>("value", LongSerializer.INSTANCE);
        ListStateDescriptor<Long> ld = new ListStateDescriptor<>("list", LongSerializer.INSTANCE);
        MapStateDescriptor<Long, Long> md =
                new MapStateDescriptor<>("map", LongSerializer.INSTANCE, LongSerializer.INSTANCE);
        ValueState<Long> v = state(b, vd);
        ListState<Long> l = state(b, ld);
        MapState<Long, Long> m = state(b, md);
        for (long k = 0; k < n; k++) {
            b.setCurrentKey(k);
            v.update(k);
            l.add(k);
            Map<Long, Long> entries = new HashMap<>();
            for (long i = 0; i < MAP_ENTRIES; i++) {
                entries.put(i, k + i);
            }
            m.putAll(entries);
        }
        long[] order = shuffled(n, seed);
        settle(b, null);
        figs.time("no-op (set key)", n, () -> {
            long acc = 0;
            for (long k : order) {
                b.setCurrentKey(k);
                acc += b.getCurrentKeyGroupIndex();
            }
            sink = acc;
        });
        figs.time("value get", n, () -> {
            long acc = 0;
            for (long k : order) {
                b.setCurrentKey(k);
                Long x = v.value();
                acc += x == null ? 0 : x;
            }
            sink = acc;
        });
        figs.time("value update", n, () -> {
            for (long k : order) {
                b.setCurrentKey(k);
                v.update(k + 1);
            }
        });
        figs.time("value add", n, () -> {
            for (long k : order) {
                b.setCurrentKey(k + n);
                v.update(k);
            }
        });
        figs.time("list add", n, () -> {
            for (long k : order) {
                b.setCurrentKey(k + n);
                l.add(k);
            }
        });
        figs.time("list append", n, () -> {
            for (long k : order) {
                b.setCurrentKey(k);
                l.add(k);
            }
        });
        settle(b, ld);
        figs.time("list get", n, () -> {
            long acc = 0;
            for (long k : order) {
                b.setCurrentKey(k);
                // Every element read, as our list get returns them all.
                for (Long x : l.get()) {
                    acc += x;
                }
            }
            sink = acc;
        });
        List<Long> batch = new ArrayList<>(ADD_ALL);
        for (long i = 0; i < ADD_ALL; i++) {
            batch.add(i);
        }
        long few = n / 10;
        figs.time("list add_all(100)", few, () -> {
            for (int i = 0; i < few; i++) {
                b.setCurrentKey(order[i] + 2 * n);
                l.addAll(batch);
            }
        });
        settle(b, null);
        figs.time("map get", n, () -> {
            long acc = 0;
            for (long k : order) {
                b.setCurrentKey(k);
                Long x = m.get(k % MAP_ENTRIES);
                acc += x == null ? 0 : x;
            }
            sink = acc;
        });
        settle(b, null);
        figs.time("map contains", n, () -> {
            long acc = 0;
            for (long k : order) {
                b.setCurrentKey(k);
                acc += m.contains(k % (2 * MAP_ENTRIES)) ? 1 : 0;
            }
            sink = acc;
        });
        settle(b, null);
        figs.time("map iterate(10)", n, () -> {
            long acc = 0;
            for (long k : order) {
                b.setCurrentKey(k);
                Iterator<Map.Entry<Long, Long>> it = m.iterator();
                while (it.hasNext()) {
                    Map.Entry<Long, Long> e = it.next();
                    acc += e.getKey() + e.getValue();
                }
            }
            sink = acc;
        });
        figs.time("map put", n, () -> {
            for (long k : order) {
                b.setCurrentKey(k);
                m.put(k % MAP_ENTRIES, k);
            }
        });
    }

    // ------------------------------------------------------------------ checkpoints

    static final class Checkpoint {
        KeyedStateHandle handle;
        double syncSeconds;
        double totalSeconds;
        double cpuSeconds;
        long stateSize;
        long checkpointedSize;
    }

    static Checkpoint snapshot(
            AbstractKeyedStateBackend<Long> b, long id, FsCheckpointStreamFactory f, SharedStateRegistry registry)
            throws Exception {
        Checkpoint c = new Checkpoint();
        double cpu0 = processCpuSeconds();
        long t = System.nanoTime();
        RunnableFuture<SnapshotResult<KeyedStateHandle>> future =
                b.snapshot(id, System.currentTimeMillis(), f, CheckpointOptions.forCheckpointWithDefaultLocation());
        c.syncSeconds = (System.nanoTime() - t) / 1e9;
        future.run();
        c.handle = future.get().getJobManagerOwnedSnapshot();
        c.totalSeconds = (System.nanoTime() - t) / 1e9;
        c.cpuSeconds = processCpuSeconds() - cpu0;
        c.stateSize = c.handle.getStateSize();
        c.checkpointedSize = c.handle.getCheckpointedSize();
        // What the checkpoint coordinator does on completion: shared files of an incremental
        // checkpoint that an earlier one uploaded are placeholders until registered.
        c.handle.registerSharedStates(registry, id);
        registry.checkpointCompleted(id);
        b.notifyCheckpointComplete(id);
        return c;
    }

    static void result(String backend, String what, double value) {
        System.out.printf("RESULT %s %s %.4f%n", backend, what, value);
    }

    /**
     * KEYS keys with a VALUE_BYTES byte[] value state each: a full checkpoint, deltas after
     * changing 1% of the keys (RocksDB incremental checkpoints; the heap backend has none), and a
     * restore of the last checkpoint, to the local directory DIR.
     */
    static void checkpoint(String which, long keys, int valueBytes, File dir) throws Exception {
        String backend = "flink-" + which;
        File work = Files.createTempDirectory(dir.toPath(), "flink-ckpt").toFile();
        ExecutorService io = Executors.newFixedThreadPool(4);
        try {
            File checkpoints = new File(work, "checkpoints");
            File shared = new File(checkpoints, "shared");
            File exclusive = new File(checkpoints, "chk");
            shared.mkdirs();
            exclusive.mkdirs();
            // Flink's defaults: state below 20 KiB inline in the handle, a 4 KiB write buffer.
            FsCheckpointStreamFactory factory =
                    new FsCheckpointStreamFactory(
                            FileSystem.getLocalFileSystem(),
                            new Path(exclusive.toURI()),
                            new Path(shared.toURI()),
                            20 * 1024,
                            4096);
            SharedStateRegistry registry = new SharedStateRegistryImpl();
            boolean rocks = which.equals("rocksdb");
            AbstractKeyedStateBackend<Long> b =
                    create(which, new File(work, "db"), rocks, Collections.emptyList(), io);
            ValueStateDescriptor<byte[]> d =
                    new ValueStateDescriptor<>("payload", BytePrimitiveArraySerializer.INSTANCE);
            ValueState<byte[]> v = state(b, d);
            System.out.printf("Flink %s checkpoint benchmark: %d keys, %d-byte values, dir %s, load average %s%n",
                    which, keys, valueBytes, work, loadAverage());
            long t = System.nanoTime();
            for (long k = 0; k < keys; k++) {
                byte[] value = value(valueBytes, k, 0);
                b.setCurrentKey(k);
                v.update(value);
            }
            if (b instanceof RocksDBKeyedStateBackend) {
                FlowstateRocksAccess.waitIdle((RocksDBKeyedStateBackend<Long>) b);
            }
            System.out.printf("  populated in %.1f s%n", (System.nanoTime() - t) / 1e9);

            Checkpoint full = snapshot(b, 1, factory, registry);
            System.out.printf("  full checkpoint%s: sync %.3f s, total %.2f s, %.1f MB (%.0f MB/s), %.2f s CPU%n",
                    rocks ? " (first incremental: every SST file)" : "",
                    full.syncSeconds, full.totalSeconds, full.checkpointedSize / 1e6,
                    full.checkpointedSize / 1e6 / full.totalSeconds, full.cpuSeconds);
            result(backend, "ckpt_full_s", full.totalSeconds);
            result(backend, "ckpt_full_sync_ms", full.syncSeconds * 1e3);
            result(backend, "ckpt_full_mb", full.checkpointedSize / 1e6);
            Checkpoint last = full;
            if (rocks) {
                // 1% of the keys, spread over all key groups, three times (other keys each time):
                // each checkpoint a delta on top of the previous one.
                List<Checkpoint> deltas = new ArrayList<>();
                for (long round = 0; round < 3; round++) {
                    for (long k = round; k < keys; k += 100) {
                        byte[] value = value(valueBytes, k, round + 1);
                        b.setCurrentKey(k);
                        v.update(value);
                    }
                    last = snapshot(b, 2 + round, factory, registry);
                    deltas.add(last);
                }
                List<Checkpoint> sorted = new ArrayList<>(deltas);
                sorted.sort(Comparator.comparingDouble(c -> c.totalSeconds));
                Checkpoint med = sorted.get(1);
                System.out.printf("  incremental after changing 1%% of keys (median of 3 successive): sync %.3f s, total %.2f s, %.1f MB new%n",
                        med.syncSeconds, med.totalSeconds, med.checkpointedSize / 1e6);
                result(backend, "ckpt_delta_s", med.totalSeconds);
                result(backend, "ckpt_delta_mb", med.checkpointedSize / 1e6);
            } else {
                System.out.println("  incremental: none (HashMapStateBackend checkpoints are always full; only the changelog backend makes them incremental)");
            }
            b.dispose();
            deleteRecursively(new File(work, "db"));
            System.gc();

            long live = live();
            double cpu0 = processCpuSeconds();
            t = System.nanoTime();
            AbstractKeyedStateBackend<Long> r =
                    create(which, new File(work, "restored"), rocks, Collections.singletonList(last.handle), io);
            ValueState<byte[]> rv = state(r, d);
            double restore = (System.nanoTime() - t) / 1e9;
            double restoreCpu = processCpuSeconds() - cpu0;
            // A key no delta changed (the deltas change keys 0, 1 and 2 modulo 100).
            long probe = keys / 2 + 50;
            r.setCurrentKey(probe);
            if (!Arrays.equals(rv.value(), value(valueBytes, probe, 0))) {
                throw new IllegalStateException("restored state does not hold key " + probe);
            }
            System.out.printf("  restore of the last checkpoint: %.2f s (%.0f MB/s of checkpointed state), %.2f s CPU (all threads)%n",
                    restore, last.stateSize / 1e6 / restore, restoreCpu);
            result(backend, "restore_s", restore);
            System.out.printf("  (Java heap used after restore: %.0f MB above the start)%n", (live() - live) / 1e6);
            r.dispose();
        } finally {
            io.shutdownNow();
            deleteRecursively(work);
        }
    }

    // ------------------------------------------------------------------ rescale

    /** The key-group ranges of a job of {@code parallelism}, as Flink assigns them to subtasks. */
    static KeyGroupRange[] ranges(int parallelism) {
        KeyGroupRange[] r = new KeyGroupRange[parallelism];
        for (int i = 0; i < parallelism; i++) {
            r[i] = KeyGroupRangeAssignment.computeKeyGroupRangeForOperatorIndex(MAX_PARALLELISM, parallelism, i);
        }
        return r;
    }

    /** The subtask among {@code ranges} that owns key {@code k}, by Flink's key-group assignment. */
    static int owner(KeyGroupRange[] ranges, long k) {
        int kg = KeyGroupRangeAssignment.assignToKeyGroup(k, MAX_PARALLELISM);
        for (int i = 0; i < ranges.length; i++) {
            if (ranges[i].contains(kg)) {
                return i;
            }
        }
        throw new IllegalStateException("key group " + kg + " of key " + k + " has no owner");
    }

    /** One checkpoint of every subtask of a job: the handles (subtask order), time and bytes. */
    static final class JobCheckpoint {
        final List<KeyedStateHandle> handles = new ArrayList<>();
        double seconds;
        double cpuSeconds;
        long checkpointedSize;
    }

    /**
     * Checkpoint {@code id} of every backend: the synchronous parts one after the other (a
     * barrier reaching each subtask), the asynchronous parts side by side (each subtask's async
     * thread), then what the coordinator does on completion.
     */
    static JobCheckpoint snapshotJob(
            List<AbstractKeyedStateBackend<Long>> backends,
            long id,
            FsCheckpointStreamFactory f,
            SharedStateRegistry registry)
            throws Exception {
        JobCheckpoint c = new JobCheckpoint();
        double cpu0 = processCpuSeconds();
        long t = System.nanoTime();
        List<RunnableFuture<SnapshotResult<KeyedStateHandle>>> futures = new ArrayList<>();
        for (AbstractKeyedStateBackend<Long> b : backends) {
            futures.add(b.snapshot(id, System.currentTimeMillis(), f, CheckpointOptions.forCheckpointWithDefaultLocation()));
        }
        ExecutorService async = Executors.newFixedThreadPool(backends.size());
        try {
            for (RunnableFuture<SnapshotResult<KeyedStateHandle>> future : futures) {
                async.execute(future);
            }
            for (RunnableFuture<SnapshotResult<KeyedStateHandle>> future : futures) {
                c.handles.add(future.get().getJobManagerOwnedSnapshot());
            }
        } finally {
            async.shutdown();
        }
        c.seconds = (System.nanoTime() - t) / 1e9;
        c.cpuSeconds = processCpuSeconds() - cpu0;
        for (KeyedStateHandle h : c.handles) {
            c.checkpointedSize += h.getCheckpointedSize();
            h.registerSharedStates(registry, id);
        }
        registry.checkpointCompleted(id);
        for (AbstractKeyedStateBackend<Long> b : backends) {
            b.notifyCheckpointComplete(id);
        }
        return c;
    }

    /** The backends of a restored job, each subtask's time, and the whole step's. */
    static final class Restored {
        final List<AbstractKeyedStateBackend<Long>> backends = new ArrayList<>();
        final List<ValueState<byte[]>> states = new ArrayList<>();
        final List<Integer> handleCounts = new ArrayList<>();
        double[] seconds;
        double wallSeconds;
        double cpuSeconds;

        double slowest() {
            return Arrays.stream(seconds).max().orElse(0);
        }

        double sum() {
            return Arrays.stream(seconds).sum();
        }
    }

    /**
     * A job of {@code parallelism} restored from {@code handles}: subtask i gets the handles
     * whose key-group range intersects its own (what Flink's StateAssignmentOperation hands a
     * RocksDB subtask for incremental handles), and the subtasks build their backends side by
     * side, as the tasks of a restarted job do. Several handles, or one over another range, is
     * Flink's rescaling restore.
     */
    static Restored restoreJob(
            File work,
            String tag,
            List<KeyedStateHandle> handles,
            int parallelism,
            ExecutorService io,
            boolean ingest,
            ValueStateDescriptor<byte[]> d)
            throws Exception {
        KeyGroupRange[] rs = ranges(parallelism);
        Restored r = new Restored();
        r.seconds = new double[parallelism];
        ExecutorService subtasks = Executors.newFixedThreadPool(parallelism);
        List<Future<AbstractKeyedStateBackend<Long>>> built = new ArrayList<>();
        double cpu0 = processCpuSeconds();
        long t0 = System.nanoTime();
        try {
            for (int i = 0; i < parallelism; i++) {
                final int subtask = i;
                final KeyGroupRange range = rs[i];
                List<KeyedStateHandle> mine = new ArrayList<>();
                for (KeyedStateHandle h : handles) {
                    KeyedStateHandle x = h.getIntersection(range);
                    if (x != null) {
                        mine.add(x);
                    }
                }
                r.handleCounts.add(mine.size());
                built.add(subtasks.submit(() -> {
                    long t = System.nanoTime();
                    AbstractKeyedStateBackend<Long> b = FlowstateRocksAccess.build(
                            new File(work, tag + "-" + subtask),
                            LongSerializer.INSTANCE,
                            MAX_PARALLELISM,
                            range,
                            ROCKSDB_MANAGED_BYTES,
                            true,
                            mine,
                            io,
                            ingest);
                    state(b, d);
                    r.seconds[subtask] = (System.nanoTime() - t) / 1e9;
                    return b;
                }));
            }
            for (Future<AbstractKeyedStateBackend<Long>> f : built) {
                AbstractKeyedStateBackend<Long> b = f.get();
                r.backends.add(b);
                r.states.add(state(b, d));
            }
        } finally {
            subtasks.shutdown();
        }
        r.wallSeconds = (System.nanoTime() - t0) / 1e9;
        r.cpuSeconds = processCpuSeconds() - cpu0;
        return r;
    }

    /** Reads back ~1000 keys spread over the key space from the subtask that owns each. */
    static void checkJob(Restored r, long keys, int valueBytes) throws Exception {
        KeyGroupRange[] rs = new KeyGroupRange[r.backends.size()];
        for (int i = 0; i < rs.length; i++) {
            rs[i] = r.backends.get(i).getKeyGroupRange();
        }
        for (long k = 0; k < keys; k += Math.max(keys / 997, 1)) {
            int i = owner(rs, k);
            r.backends.get(i).setCurrentKey(k);
            byte[] want = value(valueBytes, k, changed(k) ? 1 : 0);
            if (!Arrays.equals(r.states.get(i).value(), want)) {
                throw new IllegalStateException("restored subtask " + i + " does not hold key " + k);
            }
        }
    }

    /** The keys the incremental checkpoint of the rescale case changes: 1%, spread over all key groups. */
    static boolean changed(long k) {
        return k % 100 == 37;
    }

    /**
     * Between the steps of the rescale case: disposes the step's backends, deletes their
     * directories ({@code <prefix>-0} .. {@code <prefix>-<n-1>} under {@code work}) and asks for a
     * GC, so the next step starts without them.
     */
    static void tearDown(List<AbstractKeyedStateBackend<Long>> live, File work, String prefix, int n)
            throws IOException {
        disposeAll(live);
        live.clear();
        for (int i = 0; i < n; i++) {
            deleteRecursively(new File(work, prefix + "-" + i));
        }
        System.gc();
    }

    static void disposeAll(List<AbstractKeyedStateBackend<Long>> backends) {
        for (AbstractKeyedStateBackend<Long> b : backends) {
            b.dispose();
        }
    }

    static void printRestore(String backend, String what, String label, Restored r) {
        StringBuilder each = new StringBuilder();
        for (int i = 0; i < r.seconds.length; i++) {
            each.append(String.format("%s%.2f s (%d handle%s)", i == 0 ? "" : ", ", r.seconds[i],
                    r.handleCounts.get(i), r.handleCounts.get(i) == 1 ? "" : "s"));
        }
        System.out.printf("  %s: slowest subtask %.2f s; subtasks %s; sum %.2f s; whole step %.2f s wall, %.2f s CPU (all threads); load average %s%n",
                label, r.slowest(), each, r.sum(), r.wallSeconds, r.cpuSeconds, loadAverage());
        result(backend, what + "_s", r.slowest());
        result(backend, what + "_total_s", r.sum());
        result(backend, what + "_cpu_s", r.cpuSeconds);
    }

    /**
     * The shape of integration-tests' mmap_checkpoint benchmark on Flink's RocksDB backend: a job
     * of parallelism 2 (key groups 0-63 and 64-127 of 128), KEYS keys with a VALUE_BYTES value
     * each, every key in the backend that owns its key group; a first (full) incremental
     * checkpoint, 1% of the keys changed, a second (incremental) one; then restores of that
     * checkpoint at parallelism 2 and 3 (a rescale 2 -> 3), a checkpoint of the three and a
     * restore of it at 2 (3 -> 2). Restores run their subtasks side by side; the figure is the
     * slowest subtask's time, next to the sum over subtasks and the step's CPU time.
     */
    static void rescale(String which, long keys, int valueBytes, File dir) throws Exception {
        boolean ingest;
        switch (which) {
            case "rocksdb":
                ingest = false;
                break;
            case "rocksdb-ingest":
                ingest = true;
                break;
            default:
                throw new IllegalArgumentException("unknown backend '" + which + "' for rescale (rocksdb or rocksdb-ingest)");
        }
        String backend = "flink-" + which;
        File work = Files.createTempDirectory(dir.toPath(), "flink-rescale").toFile();
        ExecutorService io = Executors.newFixedThreadPool(4);
        ValueStateDescriptor<byte[]> d =
                new ValueStateDescriptor<>("payload", BytePrimitiveArraySerializer.INSTANCE);
        List<AbstractKeyedStateBackend<Long>> live = new ArrayList<>();
        try {
            System.out.printf("Flink %s rescale benchmark: %d keys, %d-byte values, parallelism 2 -> 3 -> 2 of %d key groups, %d MiB managed memory per backend%s, dir %s, load average %s%n",
                    which, keys, valueBytes, MAX_PARALLELISM, ROCKSDB_MANAGED_BYTES >> 20,
                    ingest ? ", ingest-DB restore mode" : "", work, loadAverage());
            KeyGroupRange[] r2 = ranges(2);
            List<ValueState<byte[]>> vs = new ArrayList<>();
            for (int i = 0; i < 2; i++) {
                AbstractKeyedStateBackend<Long> b = FlowstateRocksAccess.build(
                        new File(work, "p2-" + i), LongSerializer.INSTANCE, MAX_PARALLELISM, r2[i],
                        ROCKSDB_MANAGED_BYTES, true, Collections.emptyList(), io, ingest);
                live.add(b);
                vs.add(state(b, d));
            }
            long t = System.nanoTime();
            for (long k = 0; k < keys; k++) {
                int i = owner(r2, k);
                live.get(i).setCurrentKey(k);
                vs.get(i).update(value(valueBytes, k, 0));
            }
            for (AbstractKeyedStateBackend<Long> b : live) {
                FlowstateRocksAccess.waitIdle((RocksDBKeyedStateBackend<Long>) b);
            }
            System.out.printf("  populated in %.1f s%n", (System.nanoTime() - t) / 1e9);

            File checkpoints = new File(work, "checkpoints");
            FsCheckpointStreamFactory f2 = factory(new File(checkpoints, "p2"));
            SharedStateRegistry reg2 = new SharedStateRegistryImpl();
            JobCheckpoint full = snapshotJob(live, 1, f2, reg2);
            System.out.printf("  first checkpoint at parallelism 2 (every SST file): %.2f s, %.1f MB, %.2f s CPU%n",
                    full.seconds, full.checkpointedSize / 1e6, full.cpuSeconds);
            result(backend, "p2_ckpt_full_s", full.seconds);
            result(backend, "p2_ckpt_full_mb", full.checkpointedSize / 1e6);
            for (long k = 37; k < keys; k += 100) {
                int i = owner(r2, k);
                live.get(i).setCurrentKey(k);
                vs.get(i).update(value(valueBytes, k, 1));
            }
            JobCheckpoint inc = snapshotJob(live, 2, f2, reg2);
            System.out.printf("  incremental checkpoint after changing 1%% of the keys: %.2f s, %.1f MB new, %.2f s CPU%n",
                    inc.seconds, inc.checkpointedSize / 1e6, inc.cpuSeconds);
            result(backend, "p2_ckpt_delta_s", inc.seconds);
            result(backend, "p2_ckpt_delta_mb", inc.checkpointedSize / 1e6);
            tearDown(live, work, "p2", 2);

            Restored same = restoreJob(work, "r2", inc.handles, 2, io, ingest, d);
            live.addAll(same.backends);
            checkJob(same, keys, valueBytes);
            printRestore(backend, "restore_p2", "restore at parallelism 2", same);
            tearDown(live, work, "r2", 2);

            Restored three = restoreJob(work, "r3", inc.handles, 3, io, ingest, d);
            live.addAll(three.backends);
            checkJob(three, keys, valueBytes);
            printRestore(backend, "rescale_2_to_3", "rescale 2 -> 3", three);

            FsCheckpointStreamFactory f3 = factory(new File(checkpoints, "p3"));
            JobCheckpoint third = snapshotJob(three.backends, 1, f3, new SharedStateRegistryImpl());
            System.out.printf("  first checkpoint at parallelism 3: %.2f s, %.1f MB%n",
                    third.seconds, third.checkpointedSize / 1e6);
            result(backend, "p3_ckpt_full_mb", third.checkpointedSize / 1e6);
            tearDown(live, work, "r3", 3);
            deleteRecursively(new File(checkpoints, "p2"));

            Restored two = restoreJob(work, "r32", third.handles, 2, io, ingest, d);
            live.addAll(two.backends);
            checkJob(two, keys, valueBytes);
            printRestore(backend, "rescale_3_to_2", "rescale 3 -> 2", two);
        } finally {
            disposeAll(live);
            io.shutdownNow();
            deleteRecursively(work);
        }
    }

    /** Flink's checkpoint streams into {@code root} with its defaults (20 KiB inline, 4 KiB buffer). */
    static FsCheckpointStreamFactory factory(File root) throws IOException {
        File shared = new File(root, "shared");
        File exclusive = new File(root, "chk");
        shared.mkdirs();
        exclusive.mkdirs();
        return new FsCheckpointStreamFactory(
                FileSystem.getLocalFileSystem(),
                new Path(exclusive.toURI()),
                new Path(shared.toURI()),
                20 * 1024,
                4096);
    }

    static double processCpuSeconds() {
        return ((com.sun.management.OperatingSystemMXBean) ManagementFactory.getOperatingSystemMXBean())
                        .getProcessCpuTime()
                / 1e9;
    }

    static long live() {
        System.gc();
        Runtime rt = Runtime.getRuntime();
        return rt.totalMemory() - rt.freeMemory();
    }

    /**
     * The value of key {@code k} in version {@code version}: pseudo-random bytes, so that
     * RocksDB's block compression (on by default in Flink) cannot shrink them below their size;
     * our checkpoints store values uncompressed, whatever their bytes.
     */
    static byte[] value(int bytes, long k, long version) {
        byte[] out = new byte[bytes];
        long s = (k * 0x9E3779B97F4A7C15L) ^ (version + 1) * 0xD1B54A32D192ED03L;
        for (int i = 0; i < bytes; i++) {
            s ^= s << 13;
            s ^= s >>> 7;
            s ^= s << 17;
            out[i] = (byte) s;
        }
        return out;
    }

    static String loadAverage() {
        try {
            String[] f = new String(Files.readAllBytes(new File("/proc/loadavg").toPath())).split(" ");
            return f[0] + " " + f[1] + " " + f[2];
        } catch (IOException e) {
            return "?";
        }
    }

    static void deleteRecursively(File f) throws IOException {
        if (!f.exists()) {
            return;
        }
        try (Stream<java.nio.file.Path> walk = Files.walk(f.toPath())) {
            walk.sorted(Comparator.reverseOrder()).forEach(p -> p.toFile().delete());
        }
    }
}
