/*
 * libkrun.h: this project's declaration of the libkrun C API that crun's krun handler needs at
 * build time. crun's configure (`--with-libkrun`) only checks that <libkrun.h> exists; its
 * handler (containers/crun 1.21, src/libcrun/handlers/krun.c) dlopens libkrun.so.1 and resolves
 * each function with dlsym. So the header names the calls that handler makes, with the
 * signatures libkrun v1.18.0 documents (include/libkrun.h there), written here from that
 * documentation: every function returns 0 (or, for krun_create_ctx, a context id) on success and
 * a negative errno value on failure.
 *
 * Build crun against it with CPPFLAGS=-I<this directory> (suites/standins/crun/build.py does).
 * The QEMU-backed stand-in (libkrun_qemu.c) implements the same calls; build.py compiles a check
 * that both agree.
 */
#ifndef AGENTBOX_STANDIN_LIBKRUN_H
#define AGENTBOX_STANDIN_LIBKRUN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A new, empty VM context; its id, or a negative errno value. */
int32_t krun_create_ctx(void);

/* The library's log level: 0 off, 1 error, 2 warn, 3 info, 4 debug, 5 trace. */
int32_t krun_set_log_level(uint32_t level);

/* The number of vCPUs and the MiB of RAM the VM gets. */
int32_t krun_set_vm_config(uint32_t ctx_id, uint8_t num_vcpus, uint32_t ram_mib);

/* The host directory that becomes the guest's root filesystem. */
int32_t krun_set_root(uint32_t ctx_id, const char *root_path);

/* The working directory of the guest's first process, a path inside the guest. */
int32_t krun_set_workdir(uint32_t ctx_id, const char *workdir_path);

/* Confidential-computing flavour (libkrun-sev.so.1) only: a disk image as the root. */
int32_t krun_set_root_disk(uint32_t ctx_id, const char *disk_path);

/* Confidential-computing flavour (libkrun-sev.so.1) only: the TEE configuration file. */
int32_t krun_set_tee_config_file(uint32_t ctx_id, const char *file_path);

/* Starts the VM in the calling process. Returns only on failure (a negative errno value); on
 * success the process exits with the status of the guest's workload. */
int32_t krun_start_enter(uint32_t ctx_id);

#ifdef __cplusplus
}
#endif

#endif /* AGENTBOX_STANDIN_LIBKRUN_H */
