/*
 * libkrun_qemu: a QEMU-backed stand-in for libkrun.so, for hosts where
 * libkrun cannot run (no package, or a KVM that boots only paravirtual
 * kernels). It implements the part of the libkrun C API that agentbox's
 * microvm helper calls and keeps the semantics the helper depends on:
 *
 *   krun_create_ctx / krun_free_ctx          contexts by id, -EINVAL for unknown ids
 *   krun_set_log_level(level)                installs the process's logger once (a second call
 *                                            aborts, as libkrun's env_logger init panics); 0 off,
 *                                            1 error ... 5 trace, RUST_LOG overriding the level.
 *                                            Console text with non-TTY stdio is a log record at
 *                                            error level (target init_or_kernel), so at level 0
 *                                            without RUST_LOG it is dropped, as upstream
 *   krun_set_vm_config(vcpus, ram_mib)       -smp / -m
 *   krun_set_root(dir)                       the guest's / is that directory
 *   krun_add_disk / krun_add_disk2           virtio-blk in call order, the block id as the serial
 *   krun_add_virtiofs[2,3](tag, dir, ...)    a share mounted by tag (read-only flag kept)
 *   krun_set_port_map(map)                   checked as libkrun checks it; changes nothing (see there)
 *   krun_set_workdir                         the command's cwd (relative to the root)
 *   krun_set_exec(path, argv, envp)          path run with argv[0]=path then argv; envp NULL = caller's env
 *   krun_set_env                             the environment without touching exec
 *   krun_disable_implicit_console            accepted
 *   krun_add_virtio_console_default(i, o, e) the console on those fds; TTY fds give one console
 *                                            port, non-TTY fds give the ports krun-stdin,
 *                                            krun-stdout, krun-stderr that the guest command's
 *                                            stdio is redirected to (as libkrun's init does)
 *   krun_add_vsock_port2(port, path, true)   the VMM listens on unix socket `path` (created at
 *                                            start, an existing file is an error as for libkrun)
 *                                            and each connection reaches guest port `port`
 *   krun_start_enter                         never returns on success; the process exits with
 *                                            the guest command's status (125/126/127 as libkrun
 *                                            documents for init failures)
 *
 * What differs from real libkrun:
 *   - The VMM is qemu-system (KVM when a cached probe boot proved it, TCG
 *     otherwise), started by a Python launcher this library execs into; the
 *     launcher's path and interpreter are compiled in (-DSTANDIN_PYTHON,
 *     -DSTANDIN_LAUNCHER).
 *   - The kernel is the root's own /boot/vmlinuz-* with the modules the boot
 *     needs in a generated initramfs (libkrun brings its kernel in libkrunfw).
 *   - Shares (the root and every virtiofs tag) are virtio-9p, not virtio-fs;
 *     guest code that mounts by tag must accept either transport.
 *   - PID 1 is a busybox sh script the launcher generates (placed in a tmpfs
 *     at /run/agentbox), not libkrun's init.krun; it mounts /proc, /sys,
 *     /dev/pts, /dev/shm, /tmp and cgroup2, loads the kernel modules the
 *     initramfs left out (btrfs, overlay, fuse, tun: libkrunfw builds them
 *     in) from the root in the background, and brings up qemu user-mode
 *     networking (libkrun uses TSI or passt).
 *   - The kernel console (ttyS0) and the console port go to the caller's
 *     stderr when it is not a terminal.
 *   - These hosts have no virtio-vsock, so a listening vsock port is carried
 *     by a virtio-serial port named org.agentbox.vsock.<port> (guest code
 *     serves that name when AF_VSOCK has no transport), one connection at a
 *     time (libkrun bridges several at once; later ones wait their turn).
 *     Guest-initiated ports (krun_add_vsock_port, krun_add_vsock_port2 with
 *     listen=false) return -ENOTSUP.
 *   - Every other libkrun function is absent, so a caller that needs one fails
 *     at symbol lookup instead of silently misbehaving.
 *   - Loaded by a real crun's krun handler (KRUN_STANDIN_CRUN=1), krun_start_enter runs inside
 *     the container and hands the context to a host-side VMM started when the library was
 *     loaded; a context without krun_set_exec then runs what /.krun_config.json says, as
 *     libkrun's init does. crun_bridge.c says how, and what differs there.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "crun_bridge.h"

#ifndef STANDIN_PYTHON
#error "build with -DSTANDIN_PYTHON=\"/path/to/python\""
#endif
#ifndef STANDIN_LAUNCHER
#error "build with -DSTANDIN_LAUNCHER=\"/path/to/launcher.py\""
#endif

extern char **environ;

#define MAX_CTX 8
#define MAX_DEV 16

struct disk { char *id, *path; int format; bool read_only; };
struct share { char *tag, *path; bool read_only; };
struct vsock_port { uint32_t port; char *path; };

struct ctx {
    bool used;
    int vcpus;
    uint32_t ram_mib;
    char *root, *workdir, *exec_path;
    char **argv, **envp;
    bool env_set;
    struct disk disks[MAX_DEV];
    int ndisks;
    struct share shares[MAX_DEV];
    int nshares;
    struct vsock_port vsock[MAX_DEV];
    int nvsock;
    bool implicit_console;
    bool console;
    int con_in, con_out, con_err;
};

static struct ctx ctxs[MAX_CTX];

static struct ctx *get(uint32_t id) {
    if (id >= MAX_CTX || !ctxs[id].used) return NULL;
    return &ctxs[id];
}


static char **dup_vec(const char *const *v) {
    size_t n = 0;
    while (v && v[n]) n++;
    char **out = calloc(n + 1, sizeof(char *));
    if (!out) return NULL;
    for (size_t i = 0; i < n; i++) out[i] = strdup(v[i]);
    return out;
}

static void free_vec(char **v) {
    for (size_t i = 0; v && v[i]; i++) free(v[i]);
    free(v);
}

int32_t krun_create_ctx(void) {
    for (int i = 0; i < MAX_CTX; i++) {
        if (!ctxs[i].used) {
            memset(&ctxs[i], 0, sizeof ctxs[i]);
            ctxs[i].used = true;
            ctxs[i].vcpus = 1;
            ctxs[i].ram_mib = 512;
            ctxs[i].implicit_console = true;
            return i;
        }
    }
    return -ENOMEM;
}

int32_t krun_free_ctx(uint32_t id) {
    struct ctx *c = get(id);
    if (!c) return -EINVAL;
    free(c->root); free(c->workdir); free(c->exec_path);
    free_vec(c->argv); free_vec(c->envp);
    for (int i = 0; i < c->ndisks; i++) { free(c->disks[i].id); free(c->disks[i].path); }
    for (int i = 0; i < c->nshares; i++) { free(c->shares[i].tag); free(c->shares[i].path); }
    for (int i = 0; i < c->nvsock; i++) free(c->vsock[i].path);
    memset(c, 0, sizeof *c);
    return 0;
}

/* What no real libkrun exports: agentbox's doctor and harness name a stand-in by it, so that a run
 * under --agentbox-strict never counts this library as libkrun unless asked to. */
const char agentbox_krun_standin[] = "qemu";

/* -1: no logger installed (libkrun logs nothing until krun_set_log_level). */
static int logger_level = -1;

int32_t krun_set_log_level(uint32_t level) {
    if (logger_level >= 0) {
        fputs("krun-standin: krun_set_log_level called twice (libkrun's logger init panics)\n", stderr);
        abort();
    }
    logger_level = level > 5 ? 5 : (int)level;
    return 0;
}

int32_t krun_set_vm_config(uint32_t id, uint8_t vcpus, uint32_t ram_mib) {
    struct ctx *c = get(id);
    if (!c) return -EINVAL;
    if (vcpus == 0 || ram_mib == 0) return -EINVAL;
    c->vcpus = vcpus;
    c->ram_mib = ram_mib;
    return 0;
}

int32_t krun_set_root(uint32_t id, const char *root) {
    struct ctx *c = get(id);
    if (!c || !root) return -EINVAL;
    free(c->root);
    c->root = strdup(root);
    return 0;
}

int32_t krun_add_disk2(uint32_t id, const char *block_id, const char *path, uint32_t format, bool read_only) {
    struct ctx *c = get(id);
    if (!c || !block_id || !path || format > 1) return -EINVAL;
    if (c->ndisks >= MAX_DEV) return -ENOSPC;
    for (int i = 0; i < c->ndisks; i++)
        if (strcmp(c->disks[i].id, block_id) == 0) return -EEXIST;
    c->disks[c->ndisks++] = (struct disk){strdup(block_id), strdup(path), (int)format, read_only};
    return 0;
}

int32_t krun_add_disk(uint32_t id, const char *block_id, const char *path, bool read_only) {
    return krun_add_disk2(id, block_id, path, 0, read_only);
}

int32_t krun_add_virtiofs3(uint32_t id, const char *tag, const char *path, uint64_t shm_size, bool read_only) {
    (void)shm_size;
    struct ctx *c = get(id);
    if (!c || !tag || !path) return -EINVAL;
    if (c->nshares >= MAX_DEV) return -ENOSPC;
    for (int i = 0; i < c->nshares; i++)
        if (strcmp(c->shares[i].tag, tag) == 0) return -EEXIST;
    c->shares[c->nshares++] = (struct share){strdup(tag), strdup(path), read_only};
    return 0;
}

int32_t krun_add_virtiofs2(uint32_t id, const char *tag, const char *path, uint64_t shm_size) {
    return krun_add_virtiofs3(id, tag, path, shm_size, false);
}

int32_t krun_add_virtiofs(uint32_t id, const char *tag, const char *path) {
    return krun_add_virtiofs3(id, tag, path, 0, false);
}

/* "host:guest" entries, each port 0-65535, no guest or host port twice (-EINVAL otherwise), as libkrun
 * v1.18 lib.rs krun_set_port_map checks them. The map changes nothing here: the stand-in's qemu user
 * network publishes no guest port with or without one (libkrun >= 1.17 under TSI exposes every
 * unmapped listening port; docs/libkrun-fidelity.md says the stand-in cannot show that). */
int32_t krun_set_port_map(uint32_t id, const char *const port_map[]) {
    unsigned hosts[1024], guests[1024];
    int n = 0;
    if (!get(id) || !port_map) return -EINVAL;
    for (int i = 0; port_map[i]; i++) {
        unsigned h, g;
        char tail;
        if (n >= 1024 || sscanf(port_map[i], "%u:%u%c", &h, &g, &tail) != 2 || h > 65535 || g > 65535)
            return -EINVAL;
        for (int j = 0; j < n; j++)
            if (hosts[j] == h || guests[j] == g) return -EINVAL;
        hosts[n] = h;
        guests[n++] = g;
    }
    return 0;
}

int32_t krun_set_workdir(uint32_t id, const char *workdir) {
    struct ctx *c = get(id);
    if (!c || !workdir) return -EINVAL;
    free(c->workdir);
    c->workdir = strdup(workdir);
    return 0;
}

int32_t krun_set_env(uint32_t id, const char *const envp[]) {
    struct ctx *c = get(id);
    if (!c) return -EINVAL;
    free_vec(c->envp);
    c->envp = dup_vec(envp ? envp : (const char *const *)environ);
    c->env_set = true;
    return 0;
}

int32_t krun_set_exec(uint32_t id, const char *exec_path, const char *const argv[], const char *const envp[]) {
    struct ctx *c = get(id);
    if (!c || !exec_path) return -EINVAL;
    free(c->exec_path);
    c->exec_path = strdup(exec_path);
    free_vec(c->argv);
    c->argv = dup_vec(argv);
    if (envp || !c->env_set) {
        free_vec(c->envp);
        c->envp = dup_vec(envp ? envp : (const char *const *)environ);
    }
    return 0;
}

int32_t krun_disable_implicit_console(uint32_t id) {
    struct ctx *c = get(id);
    if (!c) return -EINVAL;
    c->implicit_console = false;
    return 0;
}

int32_t krun_add_virtio_console_default(uint32_t id, int input_fd, int output_fd, int err_fd) {
    struct ctx *c = get(id);
    if (!c || input_fd < 0 || output_fd < 0 || err_fd < 0) return -EINVAL;
    if (c->console) return -EEXIST;
    c->console = true;
    c->con_in = input_fd;
    c->con_out = output_fd;
    c->con_err = err_fd;
    return 0;
}

int32_t krun_add_vsock_port(uint32_t id, uint32_t port, const char *path) {
    (void)port; (void)path;
    return get(id) ? -ENOTSUP : -EINVAL;
}

int32_t krun_add_vsock_port2(uint32_t id, uint32_t port, const char *path, bool listen) {
    struct ctx *c = get(id);
    if (!c || !path || !*path) return -EINVAL;
    if (!listen) return -ENOTSUP;
    if (c->nvsock >= MAX_DEV) return -ENOMEM;
    for (int i = 0; i < c->nvsock; i++)
        if (c->vsock[i].port == port) return -EEXIST;
    c->vsock[c->nvsock].port = port;
    c->vsock[c->nvsock].path = strdup(path);
    c->nvsock++;
    return 0;
}

/* JSON output ---------------------------------------------------------- */

static void json_str(FILE *f, const char *s) {
    if (!s) { fputs("null", f); return; }
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') fprintf(f, "\\%c", *p);
        else if (*p < 0x20) fprintf(f, "\\u%04x", *p);
        else fputc(*p, f);
    }
    fputc('"', f);
}

static void json_vec(FILE *f, char **v) {
    fputc('[', f);
    for (size_t i = 0; v && v[i]; i++) {
        if (i) fputc(',', f);
        json_str(f, v[i]);
    }
    fputc(']', f);
}

static int write_config(struct ctx *c) {
    int fd = memfd_create("krun-standin-config", 0);
    if (fd < 0) return -errno;
    FILE *f = fdopen(dup(fd), "w");
    if (!f) { close(fd); return -errno; }
    fprintf(f, "{\"vcpus\":%d,\"ram_mib\":%u,\"log_level\":%d,\"root\":", c->vcpus, c->ram_mib, logger_level);
    json_str(f, c->root);
    fputs(",\"workdir\":", f);
    json_str(f, c->workdir);
    fputs(",\"exec_path\":", f);
    json_str(f, c->exec_path);
    fputs(",\"argv\":", f);
    json_vec(f, c->argv);
    fputs(",\"env\":", f);
    json_vec(f, c->envp);
    fputs(",\"disks\":[", f);
    for (int i = 0; i < c->ndisks; i++) {
        fputs(i ? ",{\"id\":" : "{\"id\":", f);
        json_str(f, c->disks[i].id);
        fputs(",\"path\":", f);
        json_str(f, c->disks[i].path);
        fprintf(f, ",\"format\":\"%s\",\"read_only\":%s}", c->disks[i].format ? "qcow2" : "raw",
                c->disks[i].read_only ? "true" : "false");
    }
    fputs("],\"shares\":[", f);
    for (int i = 0; i < c->nshares; i++) {
        fputs(i ? ",{\"tag\":" : "{\"tag\":", f);
        json_str(f, c->shares[i].tag);
        fputs(",\"path\":", f);
        json_str(f, c->shares[i].path);
        fprintf(f, ",\"read_only\":%s}", c->shares[i].read_only ? "true" : "false");
    }
    fputs("],\"vsock_listen\":[", f);
    for (int i = 0; i < c->nvsock; i++) {
        fprintf(f, "%s{\"port\":%u,\"path\":", i ? "," : "", c->vsock[i].port);
        json_str(f, c->vsock[i].path);
        fputc('}', f);
    }
    fputs("],\"console\":", f);
    if (c->console) fprintf(f, "[%d,%d,%d]", c->con_in, c->con_out, c->con_err);
    else fputs("null", f);
    fprintf(f, ",\"implicit_console\":%s}", c->implicit_console ? "true" : "false");
    if (fclose(f) != 0) { close(fd); return -EIO; }
    lseek(fd, 0, SEEK_SET);
    return fd;
}

int32_t krun_start_enter(uint32_t id) {
    struct ctx *c = get(id);
    if (!c) return -EINVAL;
    if (crun_bridge_active()) {  /* inside a container of a real crun: crun_bridge.c */
        if (!c->root) return -EINVAL;
        int cfd = write_config(c);
        return cfd < 0 ? cfd : crun_bridge_enter(cfd);
    }
    if (!c->root || !c->exec_path) return -EINVAL;
    int fd = write_config(c);
    if (fd < 0) return fd;
    char fdarg[16];
    snprintf(fdarg, sizeof fdarg, "%d", fd);
    char *const argv[] = {STANDIN_PYTHON, STANDIN_LAUNCHER, "--config-fd", fdarg, NULL};
    execve(STANDIN_PYTHON, argv, environ);
    int err = errno;
    close(fd);
    return -err;
}
