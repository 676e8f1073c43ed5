// A stand-in for the NVIDIA driver (libcuda.so.1) whose GPU is the kernel emulator, so that the
// CUDA backend's own driver path -- cudarc's context, module, streams, events, asynchronous
// copies, pinned memory and launches -- runs and is tested where no GPU is. The kernels run on
// the emulator linked into the process (segk_emu_launch, found with dlsym: segk exports it).
//
// What it holds the caller to, as a GPU would:
// - Every stream is a worker thread running its operations in order; streams run concurrently,
//   ordered only by events. Copies from page-locked memory and kernel arguments are read when
//   the operation runs, not when it is queued (arguments are copied at launch, as the driver
//   does). FAKECUDA_DELAY_US=N sleeps each operation up to N us first, to widen race windows.
// - Fresh device memory is NaN bytes; copies must stay inside one allocation and pointer
//   arguments inside live ones; each allocation ends at a guard page (see Block).
//   FAKECUDA_MEM_BYTES sets the device's size.
// - Launch limits: 1024 threads per block, dynamic shared memory over 48 KiB only after
//   cuFuncSetAttribute allows it, and -- given FAKECUDA_PTXAS_REPORT, nvcc's -Xptxas -v output --
//   each kernel's sm_90 registers and static shared memory against the SM's 64K registers and
//   227 KiB of shared memory.
// - Faults on request: FAKECUDA_OOM_AFTER_LAUNCHES=N fails every device allocation once N
//   kernels were launched; FAKECUDA_FAIL_LAUNCH=N makes the N-th launch fault.
// - A kernel that fails in the emulator makes every later call fail (a sticky error), as a
//   faulting kernel does on a GPU.
// - It counts what the host waits for and reads back (fakecuda_counts), and plays an older
//   driver (FAKECUDA_DRIVER_VERSION) or the toolkit's stub library (FAKECUDA_STUB=1) on request.
// - FAKECUDA_DEVICES=N offers N devices (default 1), each the same emulator and memory, so that
//   several ranks of a multi-GPU run (one process per device) start; cuLaunchHostFunc runs host
//   functions in stream order (the fake NCCL beside this library queues its collectives so).
// Not modelled: timing, occupancy, memory pools (allocations are immediate), graphs, devices
// with memory of their own.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct Stream* CUstream;
typedef struct Event* CUevent;
typedef struct Func* CUfunction;
typedef struct Module* CUmodule;
typedef struct Ctx* CUcontext;

enum {
    OK = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    NOT_INITIALIZED = 3,
    STUB_LIBRARY = 34,
    NO_DEVICE = 100,
    INVALID_DEVICE = 101,
    INVALID_IMAGE = 200,
    UNSUPPORTED_PTX_VERSION = 222,
    NOT_FOUND = 500,
    LAUNCH_OUT_OF_RESOURCES = 701,
    LAUNCH_FAILED = 719,
};

#define MAX_PARAMS 32
#define SMEM_OPTIN (227 * 1024)
#define SMEM_DEFAULT (48 * 1024)
#define REGS_PER_SM 65536

struct Ctx { int unused; };
static struct Ctx the_ctx;
static __thread CUcontext current;

// One lock for the queues, events and allocations; one for the emulator (its state is global).
static pthread_mutex_t G = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t GC = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t EMU = PTHREAD_MUTEX_INITIALIZER;
static CUresult sticky = OK;
static int (*emu_launch)(const char*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void**);
static const char* (*emu_error)(void);
static int (*emu_param_sizes)(const char*, unsigned*, int);
static unsigned delay_us;
static size_t device_bytes = 80ull << 30;
// What the host waited for and read back, for tests that hold a training step to its count of
// synchronisations: stream, event and context synchronisations, device-to-host copies.
static unsigned long long n_stream_sync, n_event_sync, n_ctx_sync, n_dtoh;

// Read by tests in a process that loaded this library (dlsym): the counts so far.
__attribute__((visibility("default"))) void fakecuda_counts(unsigned long long out[4]) {
    pthread_mutex_lock(&G);
    out[0] = n_stream_sync;
    out[1] = n_event_sync;
    out[2] = n_ctx_sync;
    out[3] = n_dtoh;
    pthread_mutex_unlock(&G);
}

// Fault injection: device allocations fail once this many launches were made (another process
// took the memory), and launch number fail_launch faults (a kernel's illegal address).
static unsigned long long launches, oom_after = ~0ull, fail_launch = ~0ull;

static void say(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "fake libcuda: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
}

// ---- allocations ----------------------------------------------------------------------------

// A device block lives at the end of its own mapping, rounded up to 16 bytes (what segk's
// kernels may assume; the driver gives 256, and segk's host code only ever tests 16), with an
// inaccessible guard page right after it: a kernel running past the end of an allocation stops
// with a message instead of reading the neighbour. The slack is NaN bytes, checked after every
// kernel. `freeing`: cuMemFreeAsync was called, so no later launch may use it.
struct Block { uintptr_t base; size_t bytes; int pinned, freeing; void* map; size_t map_bytes; };
static struct Block* blocks;
static size_t nblocks, cap_blocks, device_used;

static void add_block(struct Block b) {
    if (nblocks == cap_blocks) {
        cap_blocks = cap_blocks ? 2 * cap_blocks : 64;
        blocks = realloc(blocks, cap_blocks * sizeof *blocks);
    }
    blocks[nblocks++] = b;
    if (!b.pinned) device_used += b.bytes;
}

// The block holding [p, p+n), or NULL. Caller holds G.
static struct Block* find_block(uintptr_t p, size_t n, int pinned) {
    for (size_t i = 0; i < nblocks; i++)
        if (blocks[i].pinned == pinned && p >= blocks[i].base && p + n <= blocks[i].base + blocks[i].bytes) return &blocks[i];
    return NULL;
}

// Forgets the block at `base` and releases its memory. Caller holds G.
static int remove_block(uintptr_t base, int pinned) {
    for (size_t i = 0; i < nblocks; i++)
        if (blocks[i].base == base && blocks[i].pinned == pinned) {
            struct Block b = blocks[i];
            blocks[i] = blocks[--nblocks];
            if (pinned) {
                free((void*)b.base);
            } else {
                device_used -= b.bytes;
                munmap(b.map, b.map_bytes);
            }
            return 1;
        }
    return 0;
}

// The size of a live block whose slack (the bytes between its end and the next 16-byte
// boundary) no longer holds NaN bytes, or 0. Caller holds G.
static size_t overwritten_block(void) {
    for (size_t i = 0; i < nblocks; i++) {
        const struct Block* b = &blocks[i];
        const unsigned char* slack = (const unsigned char*)b->base + b->bytes;
        if (b->pinned) continue;
        for (size_t k = 0; k < (16 - b->bytes % 16) % 16; k++)
            if (slack[k] != 0xff) return b->bytes;
    }
    return 0;
}

// The guard page a kernel touched, said before the process dies.
static const char* volatile running_kernel = "";
static void on_segv(int sig, siginfo_t* info, void* ctx) {
    (void)sig, (void)ctx;
    char msg[256];
    int n = snprintf(msg, sizeof msg, "fake libcuda: kernel %s accessed %p, outside its device allocations (past the end of one, or freed)\n", running_kernel, info->si_addr);
    if (n > 0) (void)!write(2, msg, (size_t)n);
    _exit(139);
}

static int is_pinned(const void* p, size_t n) {
    pthread_mutex_lock(&G);
    int r = find_block((uintptr_t)p, n, 1) != NULL;
    pthread_mutex_unlock(&G);
    return r;
}

static CUresult check_device_range(CUdeviceptr p, size_t n, const char* what) {
    pthread_mutex_lock(&G);
    int ok = n == 0 || find_block((uintptr_t)p, n, 0) != NULL;
    pthread_mutex_unlock(&G);
    if (!ok) say("%s: %zu bytes at 0x%llx outside every device allocation", what, n, p);
    return ok ? OK : INVALID_VALUE;
}

// ---- kernels ---------------------------------------------------------------------------------

struct Func {
    char name[128];
    int nparams;
    unsigned sizes[MAX_PARAMS];
    unsigned char pointer[MAX_PARAMS];  // a pointer argument: must address a live allocation
    int max_dynamic_smem;
    int regs, static_smem;  // from the ptxas report; -1 when unknown
};
struct Module { int unused; };

// Registers and static shared memory of `name` for sm_90 from nvcc's -Xptxas -v output.
static void read_report(struct Func* f) {
    f->regs = f->static_smem = -1;
    const char* path = getenv("FAKECUDA_PTXAS_REPORT");
    FILE* r = path ? fopen(path, "r") : NULL;
    if (!r) return;
    char line[512], want[200];
    snprintf(want, sizeof want, "Compiling entry function '%s' for 'sm_90'", f->name);
    int in = 0;
    while (fgets(line, sizeof line, r)) {
        if (strstr(line, "Compiling entry function")) in = strstr(line, want) != NULL;
        const char* used = in ? strstr(line, "Used ") : NULL;
        if (used) {
            f->regs = atoi(used + 5);
            const char* smem = strstr(line, " bytes smem");
            if (smem) {
                const char* s = smem;
                while (s > line && s[-1] >= '0' && s[-1] <= '9') s--;
                f->static_smem = atoi(s);
            } else {
                f->static_smem = 0;
            }
            break;
        }
    }
    fclose(r);
}

// ---- streams ---------------------------------------------------------------------------------

enum Kind { KERNEL, COPY, SET, RECORD, WAIT, FREE, HOST };
struct Op {
    enum Kind kind;
    struct Op* next;
    // KERNEL
    struct Func* f;
    unsigned grid[3], block[3], smem;
    unsigned char* args;
    // COPY / SET / FREE
    void* dst;
    const void* src;
    size_t bytes;
    unsigned char value;
    unsigned char* owned;  // a snapshot of pageable source memory
    // RECORD / WAIT
    CUevent ev;
    unsigned long long gen;
    int fault;  // KERNEL: fail as an illegal address would (FAKECUDA_FAIL_LAUNCH)
    // HOST
    void (*host_fn)(void*);
    void* host_arg;
};

struct Stream {
    pthread_t th;
    struct Op *head, *tail;
    unsigned long long queued, done;
    int quit;
};

struct Event {
    unsigned long long recorded, done;
};

static CUresult status(void);

static void run_kernel(struct Op* op) {
    void* params[MAX_PARAMS];
    size_t off = 0;
    for (int i = 0; i < op->f->nparams; i++) {
        params[i] = op->args + off;
        off += (op->f->sizes[i] + 7) & ~7u;
    }
    pthread_mutex_lock(&EMU);
    running_kernel = op->f->name;
    int rc = op->fault ? -1 : emu_launch(op->f->name, op->grid[0], op->grid[1], op->grid[2], op->block[0], op->block[1], op->block[2], op->smem, params);
    if (rc > 0) say("kernel %s failed in the emulator: %s", op->f->name, emu_error());
    if (rc < 0) say("kernel %s faulted (FAKECUDA_FAIL_LAUNCH)", op->f->name);
    pthread_mutex_unlock(&EMU);
    pthread_mutex_lock(&G);
    size_t over = rc ? 0 : overwritten_block();
    if (over) say("kernel %s wrote past the end of a device allocation of %zu bytes", op->f->name, over);
    if (rc || over) sticky = LAUNCH_FAILED;
    pthread_mutex_unlock(&G);
}

static void execute(struct Op* op) {
    switch (op->kind) {
    case KERNEL:
        // After a fault the context is lost: work queued behind it never runs.
        if (!status()) run_kernel(op);
        break;
    case HOST:
        // As on a GPU: after a fault nothing queued behind it runs.
        if (!status()) op->host_fn(op->host_arg);
        break;
    case COPY: memmove(op->dst, op->owned ? op->owned : op->src, op->bytes); break;
    case SET: memset(op->dst, op->value, op->bytes); break;
    case FREE:
        pthread_mutex_lock(&G);
        remove_block((uintptr_t)op->dst, 0);
        pthread_mutex_unlock(&G);
        break;
    case RECORD:
        pthread_mutex_lock(&G);
        if (op->gen > op->ev->done) op->ev->done = op->gen;
        pthread_mutex_unlock(&G);
        break;
    case WAIT:
        pthread_mutex_lock(&G);
        while (op->ev->done < op->gen) pthread_cond_wait(&GC, &G);
        pthread_mutex_unlock(&G);
        break;
    }
    free(op->args);
    free(op->owned);
    free(op);
}

static void* worker(void* arg) {
    struct Stream* s = arg;
    unsigned seed = (unsigned)(uintptr_t)s;
    for (;;) {
        pthread_mutex_lock(&G);
        while (!s->head && !s->quit) pthread_cond_wait(&GC, &G);
        if (!s->head) {
            pthread_mutex_unlock(&G);
            return NULL;
        }
        struct Op* op = s->head;
        s->head = op->next;
        if (!s->head) s->tail = NULL;
        pthread_mutex_unlock(&G);
        if (delay_us) usleep(rand_r(&seed) % delay_us);
        execute(op);
        pthread_mutex_lock(&G);
        s->done++;
        pthread_cond_broadcast(&GC);
        pthread_mutex_unlock(&G);
    }
}

// The legacy default stream (0) runs its operations before the call returns.
static CUresult enqueue(CUstream s, struct Op* op) {
    if (!s) {
        execute(op);
        return OK;
    }
    op->next = NULL;
    pthread_mutex_lock(&G);
    if (s->tail) s->tail->next = op; else s->head = op;
    s->tail = op;
    s->queued++;
    pthread_cond_broadcast(&GC);
    pthread_mutex_unlock(&G);
    return OK;
}

static struct Stream* streams[64];
static int nstreams;

static struct Op* new_op(enum Kind k) {
    struct Op* op = calloc(1, sizeof *op);
    op->kind = k;
    return op;
}

static void drain(CUstream s) {
    if (!s) return;
    pthread_mutex_lock(&G);
    unsigned long long target = s->queued;
    while (s->done < target) pthread_cond_wait(&GC, &G);
    pthread_mutex_unlock(&G);
}

static CUresult status(void) {
    pthread_mutex_lock(&G);
    CUresult r = sticky;
    pthread_mutex_unlock(&G);
    return r;
}

// ---- the driver API that cudarc calls ------------------------------------------------------

CUresult cuInit(unsigned flags) {
    (void)flags;
    // FAKECUDA_STUB=1 plays the CUDA toolkit's stub libcuda, which answers every call so.
    const char* stub = getenv("FAKECUDA_STUB");
    if (stub && strcmp(stub, "1") == 0) return STUB_LIBRARY;
    emu_launch = dlsym(RTLD_DEFAULT, "segk_emu_launch");
    emu_error = dlsym(RTLD_DEFAULT, "segk_emu_error");
    emu_param_sizes = dlsym(RTLD_DEFAULT, "segk_emu_param_sizes");
    if (!emu_launch || !emu_error || !emu_param_sizes) {
        say("this process does not export the kernel emulator (segk_emu_launch): no device");
        return NO_DEVICE;
    }
    const char* d = getenv("FAKECUDA_DELAY_US");
    delay_us = d ? (unsigned)atoi(d) : 0;
    const char* m = getenv("FAKECUDA_MEM_BYTES");
    if (m) device_bytes = strtoull(m, NULL, 10);
    const char* o = getenv("FAKECUDA_OOM_AFTER_LAUNCHES");
    if (o) oom_after = strtoull(o, NULL, 10);
    const char* f = getenv("FAKECUDA_FAIL_LAUNCH");
    if (f) fail_launch = strtoull(f, NULL, 10);
    // Fibers run on their own stacks; the handler gets one of its own.
    static char alt[64 * 1024];
    stack_t st = {.ss_sp = alt, .ss_size = sizeof alt};
    sigaltstack(&st, NULL);
    struct sigaction sa = {.sa_sigaction = on_segv, .sa_flags = SA_SIGINFO | SA_ONSTACK};
    sigaction(SIGSEGV, &sa, NULL);
    return OK;
}

static int n_devices(void) {
    const char* n = getenv("FAKECUDA_DEVICES");
    return n && atoi(n) > 0 ? atoi(n) : 1;
}
CUresult cuDeviceGetCount(int* n) { *n = emu_launch ? n_devices() : 0; return emu_launch ? OK : NOT_INITIALIZED; }
CUresult cuDeviceGet(CUdevice* d, int ordinal) { *d = ordinal; return ordinal >= 0 && ordinal < n_devices() ? OK : INVALID_DEVICE; }

CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    (void)d;
    snprintf(name, (size_t)len, "fake GPU (the kernel emulator)");
    return OK;
}


CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice d) {
    (void)d;
    switch (attr) {
    case 1: *v = 1024; break;          // max threads per block
    case 8: *v = SMEM_DEFAULT; break;  // shared memory per block
    case 10: *v = 32; break;           // warp size
    case 16: *v = 2; break;            // SMs: the emulator's grid-stride launches stay small
    case 75: *v = 9; break;            // compute capability 9.0
    case 76: *v = 0; break;
    case 97: *v = SMEM_OPTIN; break;   // shared memory per block, opt-in
    case 115: *v = 1; break;           // memory pools: cudarc then allocates on streams
    default: *v = 0;
    }
    return OK;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice d) { (void)d; *c = &the_ctx; return status(); }
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) { (void)d; return OK; }
CUresult cuCtxGetCurrent(CUcontext* c) { *c = current; return OK; }
CUresult cuCtxSetCurrent(CUcontext c) { current = c; return OK; }

CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    pthread_mutex_lock(&G);
    *free_bytes = device_bytes - device_used;
    *total = device_bytes;
    pthread_mutex_unlock(&G);
    return OK;
}

CUresult cuStreamCreate(CUstream* out, unsigned flags) {
    (void)flags;
    struct Stream* s = calloc(1, sizeof *s);
    pthread_mutex_lock(&G);
    int room = nstreams < 64;
    if (room) streams[nstreams++] = s;
    pthread_mutex_unlock(&G);
    if (!room || pthread_create(&s->th, NULL, worker, s)) return OUT_OF_MEMORY;
    *out = s;
    return OK;
}

static void count(unsigned long long* n) {
    pthread_mutex_lock(&G);
    ++*n;
    pthread_mutex_unlock(&G);
}

CUresult cuStreamSynchronize(CUstream s) {
    count(&n_stream_sync);
    drain(s);
    return status();
}

CUresult cuCtxSynchronize(void) {
    pthread_mutex_lock(&G);
    n_ctx_sync++;
    struct Stream* all[64];
    int n = nstreams;
    memcpy(all, streams, sizeof all);
    pthread_mutex_unlock(&G);
    for (int i = 0; i < n; i++) drain(all[i]);
    return status();
}

CUresult cuStreamDestroy_v2(CUstream s) {
    drain(s);
    pthread_mutex_lock(&G);
    s->quit = 1;
    pthread_cond_broadcast(&GC);
    pthread_mutex_unlock(&G);
    pthread_join(s->th, NULL);
    pthread_mutex_lock(&G);
    for (int i = 0; i < nstreams; i++)
        if (streams[i] == s) streams[i] = streams[--nstreams];
    pthread_mutex_unlock(&G);
    free(s);
    return OK;
}

CUresult cuEventCreate(CUevent* e, unsigned flags) { (void)flags; *e = calloc(1, sizeof(struct Event)); return OK; }
CUresult cuEventDestroy_v2(CUevent e) { free(e); return OK; }

CUresult cuEventRecord(CUevent e, CUstream s) {
    struct Op* op = new_op(RECORD);
    op->ev = e;
    pthread_mutex_lock(&G);
    op->gen = ++e->recorded;
    pthread_mutex_unlock(&G);
    enqueue(s, op);
    return status();
}

CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned flags) {
    (void)flags;
    struct Op* op = new_op(WAIT);
    op->ev = e;
    pthread_mutex_lock(&G);
    op->gen = e->recorded;
    pthread_mutex_unlock(&G);
    enqueue(s, op);
    return status();
}

CUresult cuEventSynchronize(CUevent e) {
    pthread_mutex_lock(&G);
    n_event_sync++;
    unsigned long long target = e->recorded;
    while (e->done < target) pthread_cond_wait(&GC, &G);
    pthread_mutex_unlock(&G);
    return status();
}

// FAKECUDA_DRIVER_VERSION=12040 plays a driver older than the kernels' CUDA release: it reports
// that version and refuses the module as such a driver refuses newer PTX.
static int driver_version(void) {
    const char* v = getenv("FAKECUDA_DRIVER_VERSION");
    return v ? atoi(v) : 13000;
}

CUresult cuDriverGetVersion(int* v) {
    *v = driver_version();
    return OK;
}

// A fatbin (nvcc -fatbin) starts with magic 0xBA55ED50; anything else is not what segk embeds.
CUresult cuModuleLoadData(CUmodule* m, const void* image) {
    if (driver_version() < 13000) return UNSUPPORTED_PTX_VERSION;
    uint32_t magic;
    memcpy(&magic, image, 4);
    if (magic != 0xBA55ED50u) {
        say("cuModuleLoadData: the image is not a fatbin (magic 0x%x)", magic);
        return INVALID_IMAGE;
    }
    *m = calloc(1, sizeof(struct Module));
    return status();
}

CUresult cuModuleUnload(CUmodule m) { free(m); return OK; }

CUresult cuModuleGetFunction(CUfunction* out, CUmodule m, const char* name) {
    (void)m;
    struct Func* f = calloc(1, sizeof *f);
    snprintf(f->name, sizeof f->name, "%s", name);
    f->nparams = emu_param_sizes(name, f->sizes, MAX_PARAMS);
    if (f->nparams < 0 || f->nparams > MAX_PARAMS) {
        free(f);
        return NOT_FOUND;
    }
    for (int i = 0; i < f->nparams; i++) {
        f->pointer[i] = (f->sizes[i] & 0x80000000u) != 0;
        f->sizes[i] &= 0x7fffffffu;
    }
    f->max_dynamic_smem = SMEM_DEFAULT;
    read_report(f);
    *out = f;
    return OK;
}

CUresult cuFuncSetAttribute(CUfunction f, int attr, int value) {
    if (attr == 8) {  // max dynamic shared memory
        int limit = SMEM_OPTIN - (f->static_smem > 0 ? f->static_smem : 0);
        if (value < 0 || value > limit) {
            say("cuFuncSetAttribute(%s): %d bytes of dynamic shared memory is over the limit of %d", f->name, value, limit);
            return INVALID_VALUE;
        }
        f->max_dynamic_smem = value;
    }
    return OK;
}

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned smem, CUstream s, void** params, void** extra) {
    CUresult st = status();
    if (st) return st;
    unsigned threads = bx * by * bz;
    if (extra || !threads || threads > 1024 || bz > 64 || !gx || !gy || !gz || gx > 0x7fffffffu || gy > 65535 || gz > 65535) {
        say("cuLaunchKernel(%s): invalid launch shape: grid (%u,%u,%u), block (%u,%u,%u)", f->name, gx, gy, gz, bx, by, bz);
        return INVALID_VALUE;
    }
    if ((int)smem > f->max_dynamic_smem) {
        say("cuLaunchKernel(%s): %u bytes of dynamic shared memory, %d allowed by cuFuncSetAttribute", f->name, smem, f->max_dynamic_smem);
        return INVALID_VALUE;
    }
    if (f->regs > 0) {
        // Registers are given per warp in units of 256.
        unsigned per_warp = (((unsigned)f->regs * 32 + 255) / 256) * 256;
        if (per_warp * ((threads + 31) / 32) > REGS_PER_SM) {
            say("cuLaunchKernel(%s): too many resources requested for launch (%u threads of %d registers)", f->name, threads, f->regs);
            return LAUNCH_OUT_OF_RESOURCES;
        }
    }
    if (f->static_smem >= 0 && f->static_smem + (int)smem > SMEM_OPTIN) {
        say("cuLaunchKernel(%s): %d bytes of shared memory per block", f->name, f->static_smem + (int)smem);
        return INVALID_VALUE;
    }
    for (int i = 0; i < f->nparams; i++) {
        if (!f->pointer[i]) continue;
        uintptr_t ptr;
        memcpy(&ptr, params[i], sizeof ptr);
        pthread_mutex_lock(&G);
        struct Block* b = ptr ? find_block(ptr, 1, 0) : NULL;
        int ok = !ptr || (b && !b->freeing);
        pthread_mutex_unlock(&G);
        if (!ok) {
            say("cuLaunchKernel(%s): argument %d (%p) is not in a live device allocation%s", f->name, i, (void*)ptr, b ? " (it was freed)" : "");
            return INVALID_VALUE;
        }
    }
    pthread_mutex_lock(&G);
    int fault = ++launches == fail_launch;
    pthread_mutex_unlock(&G);
    struct Op* op = new_op(KERNEL);
    op->f = f;
    op->fault = fault;
    op->grid[0] = gx, op->grid[1] = gy, op->grid[2] = gz;
    op->block[0] = bx, op->block[1] = by, op->block[2] = bz;
    op->smem = smem;
    size_t total = 0;
    for (int i = 0; i < f->nparams; i++) total += (f->sizes[i] + 7) & ~7u;
    op->args = malloc(total ? total : 1);
    size_t off = 0;
    for (int i = 0; i < f->nparams; i++) {
        memcpy(op->args + off, params[i], f->sizes[i]);
        off += (f->sizes[i] + 7) & ~7u;
    }
    return enqueue(s, op);
}

CUresult cuLaunchHostFunc(CUstream s, void (*fn)(void*), void* arg) {
    CUresult st = status();
    if (st) return st;
    struct Op* op = new_op(HOST);
    op->host_fn = fn;
    op->host_arg = arg;
    return enqueue(s, op);
}

static CUresult alloc_device(CUdeviceptr* p, size_t bytes) {
    pthread_mutex_lock(&G);
    int fits = device_used + bytes <= device_bytes && launches < oom_after;
    pthread_mutex_unlock(&G);
    if (!fits) return OUT_OF_MEMORY;
    const size_t page = 4096, body = ((bytes ? bytes : 1) + 15) & ~(size_t)15;
    const size_t data = (body + page - 1) & ~(page - 1), span = data + page;
    char* map = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) return OUT_OF_MEMORY;
    mprotect(map + data, page, PROT_NONE);
    char* base = map + data - body;
    memset(base, 0xff, body);
    pthread_mutex_lock(&G);
    add_block((struct Block){(uintptr_t)base, bytes, 0, 0, map, span});
    pthread_mutex_unlock(&G);
    *p = (CUdeviceptr)(uintptr_t)base;
    return OK;
}

// Stream-ordered allocation (the device reports memory pools, as an H100 does, so cudarc uses
// it): the memory is there at once, which is never earlier than the stream needs it.
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream s) {
    (void)s;
    CUresult st = status();
    return st ? st : alloc_device(p, bytes);
}

CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) {
    pthread_mutex_lock(&G);
    struct Block* b = find_block((uintptr_t)p, 1, 0);
    int ok = b && b->base == (uintptr_t)p && !b->freeing;
    if (ok) b->freeing = 1;
    pthread_mutex_unlock(&G);
    if (!ok) {
        say("cuMemFreeAsync(0x%llx): not the start of a live allocation", p);
        return INVALID_VALUE;
    }
    struct Op* op = new_op(FREE);
    op->dst = (void*)(uintptr_t)p;
    enqueue(s, op);
    return OK;
}


CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned flags) {
    (void)flags;
    void* m = NULL;
    if (posix_memalign(&m, 4096, bytes ? bytes : 1)) return OUT_OF_MEMORY;
    pthread_mutex_lock(&G);
    add_block((struct Block){(uintptr_t)m, bytes, 1, 0, NULL, 0});
    pthread_mutex_unlock(&G);
    *p = m;
    return OK;
}


CUresult cuMemFreeHost(void* p) {
    pthread_mutex_lock(&G);
    int known = remove_block((uintptr_t)p, 1);
    pthread_mutex_unlock(&G);
    return known ? OK : INVALID_VALUE;
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, CUstream s) {
    CUresult st = status();
    if (st || (st = check_device_range(dst, bytes, "host-to-device copy"))) return st;
    struct Op* op = new_op(COPY);
    op->dst = (void*)(uintptr_t)dst;
    op->bytes = bytes;
    if (is_pinned(src, bytes)) {
        op->src = src;  // read when the copy runs: the caller must leave it alone until then
    } else {
        op->owned = malloc(bytes ? bytes : 1);  // pageable memory is staged before the call returns
        memcpy(op->owned, src, bytes);
    }
    return enqueue(s, op);
}

CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, CUstream s) {
    CUresult st = status();
    if (st || (st = check_device_range(src, bytes, "device-to-host copy"))) return st;
    count(&n_dtoh);
    struct Op* op = new_op(COPY);
    op->dst = dst;
    op->src = (const void*)(uintptr_t)src;
    op->bytes = bytes;
    int pinned = is_pinned(dst, bytes);
    enqueue(s, op);
    // Into pageable memory the copy is done when the call returns.
    if (!pinned) drain(s);
    return status();
}

CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream s) {
    CUresult st = status();
    if (st || (st = check_device_range(dst, bytes, "device-to-device copy (destination)")) || (st = check_device_range(src, bytes, "device-to-device copy (source)"))) return st;
    struct Op* op = new_op(COPY);
    op->dst = (void*)(uintptr_t)dst;
    op->src = (const void*)(uintptr_t)src;
    op->bytes = bytes;
    return enqueue(s, op);
}


CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream s) {
    CUresult st = status();
    if (st || (st = check_device_range(dst, n, "cuMemsetD8"))) return st;
    struct Op* op = new_op(SET);
    op->dst = (void*)(uintptr_t)dst;
    op->bytes = n;
    op->value = v;
    return enqueue(s, op);
}

static const char* error_name(CUresult e) {
    switch (e) {
    case OK: return "CUDA_SUCCESS";
    case INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
    case OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
    case NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
    case STUB_LIBRARY: return "CUDA_ERROR_STUB_LIBRARY";
    case NO_DEVICE: return "CUDA_ERROR_NO_DEVICE";
    case INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
    case INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
    case UNSUPPORTED_PTX_VERSION: return "CUDA_ERROR_UNSUPPORTED_PTX_VERSION";
    case NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
    case LAUNCH_OUT_OF_RESOURCES: return "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
    case LAUNCH_FAILED: return "CUDA_ERROR_LAUNCH_FAILED";
    default: return "CUDA_ERROR_UNKNOWN";
    }
}

CUresult cuGetErrorName(CUresult e, const char** s) { *s = error_name(e); return OK; }
CUresult cuGetErrorString(CUresult e, const char** s) { *s = error_name(e); return OK; }
