/* LD_PRELOAD helper for machines without gdb: on SIGSEGV/SIGBUS/SIGABRT print the native
   backtrace (with the shared object and symbol of each frame), then die with the signal.
   gcc -shared -fPIC -O1 -o /tmp/segv_bt.so scripts/segv_backtrace.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int out_fd = 2; /* a copy of stderr taken at start: llama-cpp-python points fd 2 at /dev/null during loads */

static void on_signal(int sig) {
    void *frames[64];
    int n = backtrace(frames, 64);
    dprintf(out_fd, "\n*** signal %d (%s): native backtrace ***\n", sig, strsignal(sig));
    for (int i = 0; i < n; ++i) {
        Dl_info info;
        if (dladdr(frames[i], &info) && info.dli_fname) {
            dprintf(out_fd, "#%-2d %s(%s+0x%lx) [%p]\n", i, info.dli_fname, info.dli_sname ? info.dli_sname : "?",
                    (unsigned long) ((char *) frames[i] - (char *) (info.dli_saddr ? info.dli_saddr : info.dli_fbase)), frames[i]);
        } else {
            dprintf(out_fd, "#%-2d [%p]\n", i, frames[i]);
        }
    }
    signal(sig, SIG_DFL);
    raise(sig);
}

__attribute__((constructor)) static void install(void) {
    int fd = dup(2);
    if (fd >= 0) {
        out_fd = fd;
    }
    signal(SIGSEGV, on_signal);
    signal(SIGBUS, on_signal);
}
