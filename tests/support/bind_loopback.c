/*
 * LD_PRELOAD shim that confines listening sockets to loopback.
 *
 * Orthanc 1.10 (CivetWeb for HTTP, DCMTK for DICOM) has no bind-address
 * option and always binds the wildcard address. Tests and benchmarks must
 * never expose a server beyond 127.0.0.1, so this library interposes bind()
 * and rewrites wildcard addresses to loopback before calling the real bind:
 *
 *   AF_INET  0.0.0.0 -> 127.0.0.1
 *   AF_INET6 ::      -> ::1
 *
 * Rewriting (rather than failing) the IPv6 case keeps the process working
 * whichever family a library picks, and a socket bound to ::1 can only
 * accept loopback connections. Every other address is passed through
 * untouched, so explicit binds keep their meaning.
 *
 * Build: gcc -shared -fPIC -O2 -o libbind_loopback.so bind_loopback.c -ldl
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

static bind_fn real_bind_fn(void)
{
    /* Atomic load/store: several threads may race to the first bind(); they
       all resolve the same symbol, so the race is harmless but must not be
       a data race in the C memory model. */
    static bind_fn cached;
    bind_fn fn = __atomic_load_n(&cached, __ATOMIC_ACQUIRE);
    if (fn == NULL) {
        fn = (bind_fn)dlsym(RTLD_NEXT, "bind");
        __atomic_store_n(&cached, fn, __ATOMIC_RELEASE);
    }
    return fn;
}

int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    bind_fn real = real_bind_fn();
    if (real == NULL) {
        errno = ENOSYS;
        return -1;
    }
    if (addr == NULL) {
        return real(fd, addr, len);
    }

    if (addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in sin;
        memcpy(&sin, addr, sizeof sin);
        if (sin.sin_addr.s_addr == htonl(INADDR_ANY)) {
            sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            return real(fd, (const struct sockaddr *)&sin, sizeof sin);
        }
    } else if (addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 sin6;
        memcpy(&sin6, addr, sizeof sin6);
        if (memcmp(&sin6.sin6_addr, &in6addr_any, sizeof in6addr_any) == 0) {
            sin6.sin6_addr = in6addr_loopback;
            return real(fd, (const struct sockaddr *)&sin6, sizeof sin6);
        }
    }
    return real(fd, addr, len);
}
