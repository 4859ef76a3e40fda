/* Test-only LD_PRELOAD shim for suites/integration/test_guest_in_container.py.
 *
 * Some CI sandboxes withhold CAP_SYS_RESOURCE even from root, so no process
 * (and no privileged container) can raise RLIMIT_NOFILE's hard limit, and
 * `agentbox-guest-init libkrun enter` stops at its nofile floor (524288).
 * A real VM guest has the capability. This shim turns exactly that EPERM
 * (RLIMIT_NOFILE, raising) into success and leaves the real limit unchanged;
 * every other call goes to libc untouched.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stddef.h>
#include <sys/resource.h>
#include <sys/types.h>

typedef int (*set_fn)(__rlimit_resource_t, const struct rlimit *);
typedef int (*prlimit_fn)(pid_t, __rlimit_resource_t, const struct rlimit64 *, struct rlimit64 *);

static int forgive(__rlimit_resource_t resource, int rc) {
    if (rc != 0 && errno == EPERM && resource == RLIMIT_NOFILE) {
        errno = 0;
        return 0;
    }
    return rc;
}

int setrlimit(__rlimit_resource_t resource, const struct rlimit *limit) {
    static set_fn real;
    if (!real) real = (set_fn)dlsym(RTLD_NEXT, "setrlimit");
    return forgive(resource, real(resource, limit));
}

int setrlimit64(__rlimit_resource_t resource, const struct rlimit64 *limit) {
    static set_fn real;
    if (!real) real = (set_fn)dlsym(RTLD_NEXT, "setrlimit64");
    return forgive(resource, real(resource, (const struct rlimit *)limit));
}

int prlimit64(pid_t pid, __rlimit_resource_t resource, const struct rlimit64 *new_limit,
              struct rlimit64 *old_limit) {
    static prlimit_fn real;
    if (!real) real = (prlimit_fn)dlsym(RTLD_NEXT, "prlimit64");
    int rc = real(pid, resource, new_limit, old_limit);
    if (rc != 0 && errno == EPERM && new_limit && old_limit)
        rc = real(pid, resource, NULL, old_limit);  /* still report the old limits */
    return new_limit ? forgive(resource, rc) : rc;
}
