// A stand-in for NCCL (libnccl.so) for machines without GPUs: the ranks of a multi-GPU run are
// processes on one machine, each on the fake driver (driver.c), and their collectives meet in
// POSIX shared memory. segk's own NCCL path -- unique id, rendezvous, ncclCommInitRank, the
// collectives queued on the compute stream, ncclCommGetAsyncError, ncclCommAbort -- runs
// unchanged on it.
//
// What it holds the caller to, as NCCL would:
// - Collectives run in stream order (queued with cuLaunchHostFunc on the fake driver's stream)
//   and block that stream until every rank has queued the same collective: a rank that never
//   comes hangs the others, as on GPUs, until ncclCommAbort.
// - A rank whose process ended is noticed (its pid is gone): ncclCommGetAsyncError then says
//   ncclRemoteError and names it in ncclGetLastError; the collective still waits (NCCL's
//   kernels do) until the caller aborts.
// - Sums run in rank order, so every rank gets the same bits and a run is reproducible.
// Supported: AllReduce (sum, max, min) and AllGather, Broadcast over int32/uint32/int64/uint64/
// float/double; group calls are accepted and do nothing (each collective runs on its own).
// FAKENCCL_INIT_TIMEOUT_S bounds ncclCommInitRank's wait for the other ranks (default 120).
// Fault on request: FAKENCCL_HANG_AT=N makes this process's N-th collective never arrive (it
// waits for ncclCommAbort), as a GPU stuck in a kernel or a lost network leaves NCCL.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef int ncclResult_t;
enum { ncclSuccess = 0, ncclUnhandledCudaError = 1, ncclSystemError = 2, ncclInternalError = 3, ncclInvalidArgument = 4, ncclInvalidUsage = 5, ncclRemoteError = 6 };
enum { ncclInt32 = 2, ncclUint32 = 3, ncclInt64 = 4, ncclUint64 = 5, ncclFloat32 = 7, ncclFloat64 = 8 };
enum { ncclSum = 0, ncclMax = 2, ncclMin = 3 };
typedef struct { char internal[128]; } ncclUniqueId;

#define MAX_RANKS 64
#define CHUNK (1u << 20)
#define MAGIC 0x5e6b4e43u

struct Shared {
    uint32_t magic;
    int nranks;
    atomic_int joined;
    atomic_ullong arrived;
    pid_t pids[MAX_RANKS];
    // then nranks slots of CHUNK bytes
};

typedef struct Comm {
    struct Shared* sh;
    size_t bytes;
    int rank, nranks;
    unsigned long long barriers;  // barriers this rank has passed
    atomic_int aborted, async_error;
    char last_error[256];
} Comm;
typedef Comm* ncclComm_t;

static char* slot(Comm* c, int r) { return (char*)(c->sh + 1) + (size_t)r * CHUNK; }

static void say(Comm* c, int err, const char* msg) {
    if (c) {
        snprintf(c->last_error, sizeof c->last_error, "%s", msg);
        atomic_store(&c->async_error, err);
    }
    fprintf(stderr, "fake libnccl: %s\n", msg);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

// A rank whose process is gone, or -1.
static int dead_peer(Comm* c) {
    for (int r = 0; r < c->nranks; r++) {
        pid_t p = c->sh->pids[r];
        if (r != c->rank && p > 0 && kill(p, 0) != 0 && errno == ESRCH) return r;
    }
    return -1;
}

// Waits until every rank arrived at this barrier; 0, or -1 once the communicator is aborted.
static int barrier(Comm* c) {
    unsigned long long target = (c->barriers + 1) * (unsigned long long)c->nranks;
    atomic_fetch_add(&c->sh->arrived, 1);
    double checked = now();
    unsigned spins = 0;
    while (atomic_load(&c->sh->arrived) < target) {
        if (atomic_load(&c->aborted)) return -1;
        if (++spins > 1000) {
            struct timespec t = {0, 50000};
            nanosleep(&t, NULL);
        }
        if (now() - checked > 0.2) {
            checked = now();
            int d = dead_peer(c);
            if (d >= 0 && !atomic_load(&c->async_error)) {
                char m[128];
                snprintf(m, sizeof m, "rank %d (pid %d) exited: remote process gone", d, (int)c->sh->pids[d]);
                say(c, ncclRemoteError, m);
            }
        }
    }
    c->barriers++;
    return 0;
}

static size_t type_bytes(int t) {
    switch (t) {
    case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
    case ncclInt64: case ncclUint64: case ncclFloat64: return 8;
    default: return 0;
    }
}

#define REDUCE(T)                                                                                \
    for (size_t i = 0; i < n; i++) {                                                             \
        T acc = ((const T*)slot(c, 0))[i];                                                       \
        for (int r = 1; r < c->nranks; r++) {                                                    \
            T v = ((const T*)slot(c, r))[i];                                                     \
            acc = op == ncclSum ? acc + v : op == ncclMax ? (v > acc ? v : acc) : (v < acc ? v : acc); \
        }                                                                                        \
        ((T*)out)[i] = acc;                                                                      \
    }

static void reduce_slots(Comm* c, int type, int op, void* out, size_t n) {
    switch (type) {
    case ncclInt32: REDUCE(int32_t) break;
    case ncclUint32: REDUCE(uint32_t) break;
    case ncclInt64: REDUCE(int64_t) break;
    case ncclUint64: REDUCE(uint64_t) break;
    case ncclFloat32: REDUCE(float) break;
    case ncclFloat64: REDUCE(double) break;
    }
}

enum Coll { ALL_REDUCE, ALL_GATHER, BROADCAST };
struct Call {
    enum Coll kind;
    Comm* c;
    const char* send;
    char* recv;
    size_t count;  // values per rank (all-gather: sent by each rank)
    int type, op, root;
};

static unsigned long long calls;

// Runs on the stream's thread, in stream order.
static void run_call(void* arg) {
    struct Call* k = arg;
    Comm* c = k->c;
    const char* hang = getenv("FAKENCCL_HANG_AT");
    if (hang && ++calls == strtoull(hang, NULL, 10)) {
        fprintf(stderr, "fake libnccl: rank %d: collective %llu hangs (FAKENCCL_HANG_AT)\n", c->rank, calls);
        while (!atomic_load(&c->aborted)) usleep(1000);
        free(k);
        return;
    }
    const size_t w = type_bytes(k->type), total = k->count * w;
    for (size_t off = 0; off < total || (off == 0 && total == 0); off += CHUNK) {
        size_t len = total - off < CHUNK ? total - off : CHUNK;
        if (k->kind != BROADCAST || c->rank == k->root) memcpy(slot(c, k->kind == BROADCAST ? 0 : c->rank), k->send + off, len);
        if (barrier(c)) break;
        if (k->kind == ALL_REDUCE) reduce_slots(c, k->type, k->op, k->recv + off, len / w);
        if (k->kind == BROADCAST) memcpy(k->recv + off, slot(c, 0), len);
        if (k->kind == ALL_GATHER)
            for (int r = 0; r < c->nranks; r++) memcpy(k->recv + (size_t)r * total + off, slot(c, r), len);
        if (barrier(c)) break;
        if (total == 0) break;
    }
    free(k);
}

typedef int (*HostLaunch)(void*, void (*)(void*), void*);
static HostLaunch host_launch(void) {
    static HostLaunch f;
    if (!f) {
        void* lib = dlopen("libcuda.so", RTLD_NOW | RTLD_NOLOAD);
        if (!lib) lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
        if (lib) f = (HostLaunch)dlsym(lib, "cuLaunchHostFunc");
    }
    return f;
}

static ncclResult_t queue(struct Call* k, void* stream) {
    if (!k->c || !type_bytes(k->type) || (k->kind == ALL_REDUCE && k->op != ncclSum && k->op != ncclMax && k->op != ncclMin)) {
        free(k);
        return ncclInvalidArgument;
    }
    if (atomic_load(&k->c->aborted)) {
        free(k);
        return ncclInvalidUsage;
    }
    HostLaunch launch = host_launch();
    if (!launch) {
        say(k->c, ncclSystemError, "the fake driver (libcuda.so with cuLaunchHostFunc) is not loaded");
        free(k);
        return ncclUnhandledCudaError;
    }
    return launch(stream, run_call, k) ? ncclUnhandledCudaError : ncclSuccess;
}

// ---- the NCCL API -----------------------------------------------------------------------------

ncclResult_t ncclGetVersion(int* v) {
    *v = 22800;
    return ncclSuccess;
}

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    static atomic_uint counter;
    memset(id, 0, sizeof *id);
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    snprintf(id->internal, sizeof id->internal, "/segk-fakenccl-%d-%u-%ld", (int)getpid(), atomic_fetch_add(&counter, 1), (long)t.tv_nsec);
    return ncclSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t* out, int nranks, ncclUniqueId id, int rank) {
    if (nranks < 1 || nranks > MAX_RANKS || rank < 0 || rank >= nranks || strncmp(id.internal, "/segk-fakenccl-", 15)) return ncclInvalidArgument;
    char name[129];
    memcpy(name, id.internal, 128);
    name[128] = 0;
    size_t bytes = sizeof(struct Shared) + (size_t)nranks * CHUNK;
    int fd = shm_open(name, O_CREAT | O_RDWR, 0600);
    if (fd < 0 || ftruncate(fd, (off_t)bytes)) return ncclSystemError;
    struct Shared* sh = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (sh == MAP_FAILED) return ncclSystemError;
    Comm* c = calloc(1, sizeof *c);
    c->sh = sh, c->bytes = bytes, c->rank = rank, c->nranks = nranks;
    sh->pids[rank] = getpid();
    atomic_fetch_add(&sh->joined, 1);
    const char* t = getenv("FAKENCCL_INIT_TIMEOUT_S");
    double limit = t ? atof(t) : 120.0, start = now();
    while (atomic_load(&sh->joined) < nranks) {
        if (now() - start > limit) {
            fprintf(stderr, "fake libnccl: rank %d: %d of %d ranks joined within %.0f s\n", rank, atomic_load(&sh->joined), nranks, limit);
            munmap(sh, bytes);
            free(c);
            return ncclSystemError;
        }
        usleep(1000);
    }
    // Every rank has the segment open: its name can go.
    if (rank == 0) shm_unlink(name);
    *out = c;
    return ncclSuccess;
}

ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, int type, int op, ncclComm_t c, void* stream) {
    struct Call* k = calloc(1, sizeof *k);
    *k = (struct Call){ALL_REDUCE, c, send, recv, count, type, op, 0};
    return queue(k, stream);
}

ncclResult_t ncclAllGather(const void* send, void* recv, size_t count, int type, ncclComm_t c, void* stream) {
    struct Call* k = calloc(1, sizeof *k);
    *k = (struct Call){ALL_GATHER, c, send, recv, count, type, ncclSum, 0};
    return queue(k, stream);
}

ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, int type, int root, ncclComm_t c, void* stream) {
    struct Call* k = calloc(1, sizeof *k);
    *k = (struct Call){BROADCAST, c, send, recv, count, type, ncclSum, root};
    return queue(k, stream);
}

ncclResult_t ncclGroupStart(void) { return ncclSuccess; }
ncclResult_t ncclGroupEnd(void) { return ncclSuccess; }

ncclResult_t ncclCommGetAsyncError(ncclComm_t c, ncclResult_t* err) {
    if (!c) return ncclInvalidArgument;
    *err = atomic_load(&c->async_error);
    return ncclSuccess;
}

ncclResult_t ncclCommCount(ncclComm_t c, int* n) {
    *n = c->nranks;
    return ncclSuccess;
}

ncclResult_t ncclCommUserRank(ncclComm_t c, int* r) {
    *r = c->rank;
    return ncclSuccess;
}

// Unblocks this rank's waiting collective; the memory stays (a collective may still be leaving).
ncclResult_t ncclCommAbort(ncclComm_t c) {
    if (!c) return ncclSuccess;
    atomic_store(&c->aborted, 1);
    return ncclSuccess;
}

ncclResult_t ncclCommFinalize(ncclComm_t c) { return c ? ncclSuccess : ncclInvalidArgument; }

ncclResult_t ncclCommDestroy(ncclComm_t c) {
    if (!c) return ncclSuccess;
    munmap(c->sh, c->bytes);
    free(c);
    return ncclSuccess;
}

const char* ncclGetErrorString(ncclResult_t r) {
    switch (r) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
    case ncclSystemError: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
    case ncclInternalError: return "internal error - please report this issue to the NCCL developers";
    case ncclInvalidArgument: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
    case ncclInvalidUsage: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
    case ncclRemoteError: return "remote process exited or there was a network error";
    default: return "unknown result code";
    }
}

const char* ncclGetLastError(ncclComm_t c) { return c ? c->last_error : ""; }
