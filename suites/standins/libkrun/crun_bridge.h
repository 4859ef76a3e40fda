/* The libkrun stand-in under crun's krun handler: see crun_bridge.c. */
#ifndef AGENTBOX_STANDIN_CRUN_BRIDGE_H
#define AGENTBOX_STANDIN_CRUN_BRIDGE_H

#include <stdbool.h>
#include <stdint.h>

/* Whether this process loaded the stand-in as crun's libkrun (KRUN_STANDIN_CRUN=1 when it was
 * loaded): krun_start_enter then hands the context to the host-side VMM instead of exec'ing the
 * launcher, which the container's root does not have. */
bool crun_bridge_active(void);

/* Sends the recorded context (JSON on config_fd, which it closes) and this process's stdio to the
 * host-side VMM, then exits with the guest's status. Returns only on failure (negative errno). */
int32_t crun_bridge_enter(int config_fd);

#endif
