/*
 * Part of Flowstate's Flink comparison (benches/flink-compare). It lives in Flink's RocksDB
 * package only to reach the package-private builder settings that Flink's own
 * EmbeddedRocksDBStateBackend sets (incremental checkpoints, transfer threads, I/O executor)
 * without a TaskManager environment; it adds no behaviour of its own.
 */
package org.apache.flink.state.rocksdb;

import org.apache.flink.api.common.ExecutionConfig;
import org.apache.flink.api.common.typeutils.TypeSerializer;
import org.apache.flink.configuration.Configuration;
import org.apache.flink.core.fs.CloseableRegistry;
import org.apache.flink.metrics.groups.UnregisteredMetricsGroup;
import org.apache.flink.runtime.memory.OpaqueMemoryResource;
import org.apache.flink.runtime.state.KeyGroupRange;
import org.apache.flink.runtime.state.KeyedStateHandle;
import org.apache.flink.runtime.state.LocalRecoveryConfig;
import org.apache.flink.runtime.state.UncompressedStreamCompressionDecorator;
import org.apache.flink.runtime.state.metrics.LatencyTrackingStateConfig;
import org.apache.flink.runtime.state.metrics.SizeTrackingStateConfig;
import org.apache.flink.runtime.state.ttl.TtlTimeProvider;
import org.apache.flink.state.rocksdb.sstmerge.RocksDBManualCompactionConfig;

import java.io.File;
import java.util.Collection;
import java.util.concurrent.ExecutorService;

/** Builds Flink's RocksDB keyed backend with the settings of a default Flink 2.x job. */
public final class FlowstateRocksAccess {
    private FlowstateRocksAccess() {}

    /**
     * A RocksDB keyed backend in {@code instanceDir} over {@code range} of {@code maxParallelism}
     * key groups, sharing a block cache and write-buffer manager of {@code managedBytes} (what a
     * slot's managed memory gives Flink's backend; write-buffer ratio 0.5 and high-priority pool
     * 0.1 are Flink's defaults), restored from {@code restore} (empty: a fresh backend);
     * {@code ingestDbRestore} turns on Flink's {@code state.backend.rocksdb.use-ingest-db-restore-mode}
     * (off by default) for a restore from several handles (a rescale).
     */
    public static <K> RocksDBKeyedStateBackend<K> build(
            File instanceDir,
            TypeSerializer<K> keySerializer,
            int maxParallelism,
            KeyGroupRange range,
            long managedBytes,
            boolean incremental,
            Collection<KeyedStateHandle> restore,
            ExecutorService io,
            boolean ingestDbRestore)
            throws Exception {
        // Flink loads RocksJava's native library this way before creating a backend.
        EmbeddedRocksDBStateBackend.ensureRocksDBIsLoaded(
                System.getProperty("java.io.tmpdir"));
        RocksDBSharedResources shared =
                RocksDBMemoryControllerUtils.allocateRocksDBSharedResources(
                        managedBytes,
                        0.5,
                        0.1,
                        false,
                        RocksDBMemoryControllerUtils.RocksDBMemoryFactory.DEFAULT);
        OpaqueMemoryResource<RocksDBSharedResources> memory =
                new OpaqueMemoryResource<>(shared, managedBytes, shared::close);
        RocksDBResourceContainer options =
                new RocksDBResourceContainer(
                        new Configuration(), PredefinedOptions.DEFAULT, null, memory, instanceDir, false);
        return new RocksDBKeyedStateBackendBuilder<K>(
                        "flowstate-compare",
                        FlowstateRocksAccess.class.getClassLoader(),
                        instanceDir,
                        options,
                        name -> options.getColumnOptions(),
                        null,
                        keySerializer,
                        maxParallelism,
                        range,
                        new ExecutionConfig(),
                        LocalRecoveryConfig.BACKUP_AND_RECOVERY_DISABLED,
                        RocksDBPriorityQueueConfig.buildWithPriorityQueueType(
                                EmbeddedRocksDBStateBackend.PriorityQueueStateType.ROCKSDB),
                        TtlTimeProvider.DEFAULT,
                        LatencyTrackingStateConfig.disabled(),
                        SizeTrackingStateConfig.disabled(),
                        new UnregisteredMetricsGroup(),
                        (name, value) -> {},
                        restore,
                        UncompressedStreamCompressionDecorator.INSTANCE,
                        new CloseableRegistry())
                .setEnableIncrementalCheckpointing(incremental)
                .setNumberOfTransferingThreads(4)
                .setNativeMetricOptions(new RocksDBNativeMetricOptions())
                .setWriteBatchSize(2 << 20)
                .setIOExecutor(io)
                .setUseIngestDbRestoreMode(ingestDbRestore)
                .setManualCompactionConfig(RocksDBManualCompactionConfig.getDefault())
                .setAsyncExceptionHandler(
                        (message, error) -> {
                            System.err.println("RocksDB background error: " + message);
                            error.printStackTrace();
                        })
                .build();
    }

    /** Waits until no flush or compaction is running or pending in {@code backend}'s RocksDB. */
    public static void waitIdle(RocksDBKeyedStateBackend<?> backend) throws Exception {
        String[] busy = {
            "rocksdb.compaction-pending",
            "rocksdb.num-running-compactions",
            "rocksdb.num-running-flushes",
            "rocksdb.mem-table-flush-pending"
        };
        while (true) {
            long sum = 0;
            for (String p : busy) {
                sum += backend.db.getAggregatedLongProperty(p);
            }
            if (sum == 0) {
                return;
            }
            Thread.sleep(20);
        }
    }
}
