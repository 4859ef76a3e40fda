#define _GNU_SOURCE
/* A stand-in for libkrun.so (the one boundary that cannot exist here): it records
 * every call, one line each, to $FAKE_KRUN_LOG. $FAKE_KRUN_FAIL names a function
 * that returns -22; krun_start_enter exits the process with $FAKE_KRUN_EXIT
 * (default 0), like libkrun exits with the guest's status. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdbool.h>
#include <stdarg.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

static int32_t note(const char *name, const char *fmt, ...) {
    const char *path = getenv("FAKE_KRUN_LOG");
    if (path) {
        FILE *f = fopen(path, "a");
        if (f) {
            va_list ap;
            fprintf(f, "%s", name);
            va_start(ap, fmt);
            vfprintf(f, fmt, ap);
            va_end(ap);
            fputc('\n', f);
            fclose(f);
        }
    }
    const char *fail = getenv("FAKE_KRUN_FAIL");
    return (fail && strcmp(fail, name) == 0) ? -22 : 0;
}

int32_t krun_create_ctx(void) {
    int32_t rc = note("krun_create_ctx", "");
    return rc < 0 ? rc : 7;
}
int32_t krun_free_ctx(uint32_t ctx) { return note("krun_free_ctx", " %u", ctx); }
int32_t krun_set_log_level(uint32_t level) { return note("krun_set_log_level", " %u", level); }
int32_t krun_set_vm_config(uint32_t ctx, uint8_t vcpus, uint32_t ram) {
    return note("krun_set_vm_config", " %u %u %u", ctx, vcpus, ram);
}
int32_t krun_set_root(uint32_t ctx, const char *root) { return note("krun_set_root", " %u %s", ctx, root); }
int32_t krun_add_disk(uint32_t ctx, const char *id, const char *path, bool ro) {
    return note("krun_add_disk", " %u %s %s %d", ctx, id, path, ro);
}
int32_t krun_disable_implicit_console(uint32_t ctx) { return note("krun_disable_implicit_console", " %u", ctx); }
int32_t krun_add_virtio_console_default(uint32_t ctx, int in, int out, int err) {
    return note("krun_add_virtio_console_default", " %u %d %d %d", ctx, in, out, err);
}
static char share_path[4096];
int32_t krun_add_virtiofs3(uint32_t ctx, const char *tag, const char *path, uint64_t shm, bool ro) {
    snprintf(share_path, sizeof share_path, "%s", path);
    return note("krun_add_virtiofs3", " %u %s %s %llu %d", ctx, tag, path, (unsigned long long)shm, ro);
}
/* With $FAKE_KRUN_SHARE_PROBE, krun_start_enter reports what a file server in this process would get.
 * The root is opened as libkrun's passthrough server opens it (O_PATH|O_NOFOLLOW; containers/libkrun
 * v1.18 passthrough.rs PassthroughFs::init), so a /proc/self/fd/N path is the link, not the tree.
 * Then: the share's owner, and the errno of creating a setuid file and a character device in it, and
 * of handing a plain file to the guest's dev user (1000), each relative to that root. */
static void probe_share(void) {
    struct stat st;
    int root = open(share_path, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (root < 0 || fstat(root, &st) < 0 || !S_ISDIR(st.st_mode)) {
        note("share-root", " %s", root < 0 ? strerror(errno) : "not a directory");
        return;
    }
    note("share-root", " directory");
    note("share-owner", " %u %u", st.st_uid, st.st_gid);
    int fd = openat(root, "suid", O_CREAT | O_WRONLY, 04755);
    note("share-create-setuid", " %s", fd < 0 ? strerror(errno) : "created");
    fd = openat(root, "plain", O_CREAT | O_WRONLY, 0644);
    note("share-create-plain", " %s", fd < 0 ? strerror(errno) : "created");
    note("share-chown-dev", " %s", fchownat(root, "plain", 1000, 1000, 0) < 0 ? strerror(errno) : "done");
    note("share-chmod-setgid", " %s", fchmodat(root, "plain", 02755, 0) < 0 ? strerror(errno) : "done");
    note("share-mknod-char", " %s", mknodat(root, "null", S_IFCHR | 0666, makedev(1, 3)) < 0 ? strerror(errno) : "created");
}
int32_t krun_add_vsock_port2(uint32_t ctx, uint32_t port, const char *path, bool listen) {
    return note("krun_add_vsock_port2", " %u %u %s %d", ctx, port, path, listen);
}
int32_t krun_set_port_map(uint32_t ctx, const char *const port_map[]) {
    char buf[1024] = "";
    for (int i = 0; port_map && port_map[i]; i++) {
        strncat(buf, " ", sizeof buf - strlen(buf) - 1);
        strncat(buf, port_map[i], sizeof buf - strlen(buf) - 1);
    }
    return note("krun_set_port_map", " %u%s", ctx, buf[0] ? buf : " (empty)");
}
int32_t krun_set_workdir(uint32_t ctx, const char *dir) { return note("krun_set_workdir", " %u %s", ctx, dir); }
int32_t krun_set_exec(uint32_t ctx, const char *exec, const char *const argv[], const char *const envp[]) {
    char buf[4096] = "";
    for (int i = 0; argv && argv[i]; i++) { strncat(buf, " ", sizeof buf - strlen(buf) - 1); strncat(buf, argv[i], sizeof buf - strlen(buf) - 1); }
    strncat(buf, " |", sizeof buf - strlen(buf) - 1);
    for (int i = 0; envp && envp[i]; i++) { strncat(buf, " ", sizeof buf - strlen(buf) - 1); strncat(buf, envp[i], sizeof buf - strlen(buf) - 1); }
    return note("krun_set_exec", " %u %s%s", ctx, exec, buf);
}
int32_t krun_start_enter(uint32_t ctx) {
    int32_t rc = note("krun_start_enter", " %u", ctx);
    if (rc < 0) return rc;
    if (getenv("FAKE_KRUN_SHARE_PROBE")) probe_share();
    const char *code = getenv("FAKE_KRUN_EXIT");
    exit(code ? atoi(code) : 0);
}
