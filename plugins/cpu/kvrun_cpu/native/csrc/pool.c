/* Parallel regions for the native kernels, on the OpenMP runtime torch already loaded.
 *
 * The library links libgomp.so.1 by name, so in a process that imported torch it binds
 * to torch's own copy: the kernels and torch's matmuls share one set of threads and
 * one wait policy instead of two pools spinning against each other on the same cores.
 */
#include <omp.h>

#include "kvrun_cpu.h"

void kv_pool_run(kv_task_fn fn, const void *args, int workers)
{
    if (workers <= 1) {
        fn(args, 0, 1);
        return;
    }
#pragma omp parallel num_threads(workers)
    fn(args, omp_get_thread_num(), omp_get_num_threads());
}
