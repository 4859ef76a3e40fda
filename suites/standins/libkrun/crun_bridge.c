/*
 * crun_bridge: the QEMU-backed libkrun stand-in (libkrun_qemu.c) as a real crun's libkrun.
 *
 * Where crun calls libkrun (containers/crun 1.21, src/libcrun/handlers/krun.c and container.c):
 *   - libkrun_load dlopens libkrun.so.1 and calls krun_create_ctx in the `crun create` process,
 *     on the host, before any namespace changes;
 *   - libkrun_exec, the handler's run function, runs in the container's init process after
 *     pivot_root, the seccomp filter and the cleanup that closes every descriptor above 2
 *     (container_init: mark_or_close_fds_ge_than(preserve_fds + 3, true)). It calls
 *     krun_set_log_level(1), krun_set_vm_config (vCPUs from the CPU affinity, at most 8; RAM from
 *     the memory limit, else 2048 MiB; the krun.* annotations are not read), krun_set_root("/"),
 *     krun_set_workdir(process.cwd) and krun_start_enter. It calls no krun_set_exec: libkrun's
 *     init reads the command from /.krun_config.json, which the handler wrote into the rootfs.
 *
 * Real libkrun builds the VM inside that container process. The stand-in's VMM is qemu driven by
 * Python on the host (the container's root has neither), so the work is split in two:
 *
 *   1. Loaded into a process with KRUN_STANDIN_CRUN=1 in its environment (the crun wrapper that
 *      suites/standins/crun/build.py writes sets it, with LD_LIBRARY_PATH naming this library as
 *      libkrun.so.1), a constructor starts the host side, crun_bridge.py: a grandchild in its own
 *      session with its stdio on /dev/null (conmon waits for EOF on the stdio crun was given). It
 *      waits (READY_TIMEOUT_MS at most) for one line: "ready", or why the host side cannot serve.
 *      The host side reads the bundle's config.json (crun create runs in the bundle directory),
 *      enters the container's network namespace and listens on an abstract unix socket whose
 *      name is random. Only memory survives crun's descriptor cleanup, so that name stays in
 *      this library's data, which the container's init inherits (crun clones it, no exec).
 *   2. The write end of a pipe (close-on-exec) stays in crun's processes only. EOF on it tells the
 *      host side that none of them can still ask: crun create exited and the container's init
 *      closed its descriptors or died. With no request soon after, the host side exits.
 *   3. krun_start_enter, in the container, connects to that name and sends the recorded context
 *      (the JSON the direct path gives the launcher) with its stdin, stdout and stderr
 *      (SCM_RIGHTS). The host side boots the container's root (/proc/<peer pid>/root, the pid from
 *      SO_PEERCRED) and answers with the guest's status, which this process exits with.
 *
 * What differs from real libkrun under crun, beyond what libkrun_qemu.c lists:
 *   - The VMM is a host process outside the container: not in its cgroup, mount namespace or
 *     seccomp filter, with the host's capabilities; it joins only the container's network
 *     namespace. The container's init just waits for it.
 *   - The root is 9p of /proc/<pid>/root (the container's mount tree, bind mounts included)
 *     instead of virtio-fs of "/" served from inside the container.
 *   - A container whose network namespace crun creates itself (no path in config.json) cannot
 *     be reached: the constructor says so on stderr and krun_start_enter fails with -ENOTCONN.
 *   - Signals: as with libkrun there is no handler in the container's init (as PID 1 of its PID
 *     namespace it ignores SIGTERM from outside); when it dies, the host side stops the VM.
 */
#define _GNU_SOURCE
#include "crun_bridge.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef STANDIN_PYTHON
#error "build with -DSTANDIN_PYTHON=\"/path/to/python\""
#endif
#ifndef STANDIN_BRIDGE
#error "build with -DSTANDIN_BRIDGE=\"/path/to/crun_bridge.py\""
#endif

#define BRIDGE_ENV "KRUN_STANDIN_CRUN"
#define READY_TIMEOUT_MS 60000
#define REQUEST "agentbox-krun-standin-request 1\n"

extern char **environ;

static struct {
    int state;        /* 0: not under crun; 1: the host side listens; -1: it could not start */
    char name[96];    /* the abstract socket's name, without its leading NUL byte */
    char error[512];  /* why the host side could not start */
} bridge;

bool crun_bridge_active(void) {
    return bridge.state != 0;
}

static void failed(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(bridge.error, sizeof bridge.error, fmt, ap);
    va_end(ap);
    bridge.state = -1;
    fprintf(stderr, "krun-standin: %s\n", bridge.error);
}

/* The grandchild: exec the host side with the pipes on fds 3 (alive) and 4 (ready), nothing else
 * open, stdio on /dev/null, no signal blocked or ignored (crun blocks them all around its forks, and
 * a mask survives execve). Never returns. */
static void exec_host_side(int alive_r, int ready_w) {
    setsid();
    sigset_t none;
    sigemptyset(&none);
    for (int sig = 1; sig < NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP) signal(sig, SIG_DFL);
    sigprocmask(SIG_SETMASK, &none, NULL);
    int alive = fcntl(alive_r, F_DUPFD, 10), ready = fcntl(ready_w, F_DUPFD, 10);
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (alive < 0 || ready < 0 || null < 0) _exit(127);
    if (dup2(null, 0) < 0 || dup2(null, 1) < 0 || dup2(null, 2) < 0 || dup2(alive, 3) < 0 || dup2(ready, 4) < 0)
        _exit(127);
    if (close_range(5, ~0U, 0) != 0)
        for (int fd = 5; fd < 4096; fd++) close(fd);
    unsetenv(BRIDGE_ENV);  /* qemu and its helpers are not crun */
    char *const argv[] = {STANDIN_PYTHON, STANDIN_BRIDGE, "--name", bridge.name, "--alive-fd", "3",
                          "--ready-fd", "4", NULL};
    execve(STANDIN_PYTHON, argv, environ);
    dprintf(4, "cannot run %s: %s\n", STANDIN_PYTHON, strerror(errno));
    _exit(127);
}

/* One line from fd into out (without its newline), waiting at most timeout_ms in all. */
static void read_line(int fd, char *out, size_t size, int timeout_ms) {
    size_t n = 0;
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    out[0] = '\0';
    while (n + 1 < size) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        long spent = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
        if (spent >= timeout_ms) {
            snprintf(out, size, "no answer within %d s", timeout_ms / 1000);
            return;
        }
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r = poll(&p, 1, (int)(timeout_ms - spent));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) continue;
        ssize_t got = read(fd, out + n, 1);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0 || out[n] == '\n') break;
        n++;
    }
    out[n] = '\0';
}

__attribute__((constructor)) static void crun_bridge_start(void) {
    const char *on = getenv(BRIDGE_ENV);
    if (!on || strcmp(on, "1") != 0) return;
    unsigned char rnd[16];
    if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd) {
        failed("getrandom: %s", strerror(errno));
        return;
    }
    int n = snprintf(bridge.name, sizeof bridge.name, "agentbox-krun-standin/%ld/", (long)getpid());
    for (size_t i = 0; i < sizeof rnd; i++) n += snprintf(bridge.name + n, sizeof bridge.name - n, "%02x", rnd[i]);
    int alive[2], ready[2];
    if (pipe2(alive, O_CLOEXEC) != 0) {
        failed("pipe2: %s", strerror(errno));
        return;
    }
    if (pipe2(ready, O_CLOEXEC) != 0) {
        failed("pipe2: %s", strerror(errno));
        close(alive[0]);
        close(alive[1]);
        return;
    }
    pid_t mid = fork();
    if (mid == 0) {  /* leaves at once, so the host side is no child of crun's */
        close(alive[1]);
        close(ready[0]);
        pid_t pid = fork();
        if (pid == 0) exec_host_side(alive[0], ready[1]);
        _exit(pid < 0 ? 1 : 0);
    }
    close(alive[0]);
    close(ready[1]);
    if (mid < 0) {
        failed("fork: %s", strerror(errno));
        close(alive[1]);
        close(ready[0]);
        return;
    }
    int status;
    while (waitpid(mid, &status, 0) < 0 && errno == EINTR) {}
    char line[sizeof bridge.error - 64];
    read_line(ready[0], line, sizeof line, READY_TIMEOUT_MS);
    close(ready[0]);
    if (strcmp(line, "ready") == 0) {
        bridge.state = 1;  /* alive[1] stays open in crun's processes until they close or exit */
        return;
    }
    close(alive[1]);
    failed("the VMM side did not start: %s", line[0] ? line : "it exited without a word");
}

int32_t crun_bridge_enter(int config_fd) {
    if (bridge.state != 1) {
        fprintf(stderr, "krun-standin: %s\n", bridge.error[0] ? bridge.error : "the VMM side was not started");
        close(config_fd);
        return -ENOTCONN;
    }
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    size_t len = strlen(bridge.name);
    memcpy(addr.sun_path + 1, bridge.name, len);
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&addr, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + len)) != 0) {
        int err = errno;
        fprintf(stderr, "krun-standin: cannot reach the VMM side (@%s): %s\n", bridge.name, strerror(err));
        if (s >= 0) close(s);
        close(config_fd);
        return -err;
    }
    int fds[4] = {config_fd, 0, 1, 2};
    char payload[] = REQUEST;
    struct iovec iov = {.iov_base = payload, .iov_len = sizeof payload - 1};
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof fds)];
    } control;
    memset(&control, 0, sizeof control);
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.buf,
                         .msg_controllen = sizeof control.buf};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(cm), fds, sizeof fds);
    ssize_t sent;
    do sent = sendmsg(s, &msg, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    int err = errno;
    close(config_fd);
    if (sent != (ssize_t)iov.iov_len) {
        fprintf(stderr, "krun-standin: cannot send the context to the VMM side: %s\n",
                sent < 0 ? strerror(err) : "short write");
        close(s);
        return sent < 0 ? -err : -EIO;
    }
    int32_t status;
    size_t got = 0;
    while (got < sizeof status) {
        ssize_t r = read(s, (char *)&status + got, sizeof status - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += (size_t)r;
    }
    if (got == sizeof status) _exit(status & 0xff);  /* as libkrun: the workload's status */
    fprintf(stderr, "krun-standin: the VMM side went away without the guest's status\n");
    close(s);
    return -ECONNRESET;
}
