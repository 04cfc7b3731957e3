/* Many byte ranges of one file read in one call, outside Python's global interpreter lock.
 *
 * qbridge's checkpoint reader gathers a group of stored tensors (a mixture-of-experts layer's 256 expert
 * weights of one projection, or their scales) into the rows of one host tensor. Read one positioned read at
 * a time from Python, each read takes the interpreter's lock again when the system call returns, and a
 * reading thread waits for a loading thread that holds it. Called through ctypes (which lets the lock go for
 * the whole call), this loop reads a whole group without it.
 *
 * Built with the CPU decode (cpu_4bit.c) into one library by torch_side/_native.py. Where the system has no
 * positioned reads (not POSIX), every call answers that it read nothing, and the caller reads from Python.
 */
#if !defined(__unix__) && !defined(__APPLE__)
#include <stdint.h>
int64_t qb_read_ranges(int fd, int64_t n, const int64_t *offsets, const int64_t *lengths, char *const *addresses) {
    (void)fd, (void)offsets, (void)lengths, (void)addresses;
    return n > 0 ? 0 : -1;
}
#else
#define _DEFAULT_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif
#define QB_BATCH (IOV_MAX < 512 ? IOV_MAX : 512) /* buffers one preadv takes from this loop */

/* Reads `length` bytes of fd at `offset` into `into`, repeating short reads; 0 when all were read, else -1
 * (the end of the file came first, or a read failed). */
static int qb_read_whole(int fd, char *into, int64_t length, int64_t offset) {
    while (length > 0) {
        ssize_t got = pread(fd, into, (size_t)(length < (int64_t)1 << 30 ? length : (int64_t)1 << 30), (off_t)offset);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return -1;
        into += got;
        length -= got;
        offset += got;
    }
    return 0;
}

/* Reads the n byte ranges of the file open as `fd`: range i is lengths[i] bytes at offsets[i] in the file,
 * written to addresses[i]. Ranges that follow each other in the file (offsets[i] + lengths[i] ==
 * offsets[i + 1]: a caller fills the gaps between tensors with ranges into a scratch buffer) are read by one
 * preadv of up to QB_BATCH buffers; a preadv that comes up short, or fails, is done again range by range.
 *
 * Returns -1 when every range was read whole; else the index of the first range that was not (the end of
 * the file came first, or a read failed: errno says which), whose buffer and those after it may hold some
 * bytes. The caller reads from that range again its own way to name what went wrong. */
int64_t qb_read_ranges(int fd, int64_t n, const int64_t *offsets, const int64_t *lengths, char *const *addresses) {
    struct iovec iov[QB_BATCH];
    int64_t i = 0;
    while (i < n) {
        int64_t start = offsets[i], at = start, j = i;
        int k = 0;
        while (j < n && k < QB_BATCH && offsets[j] == at && at >= 0 && lengths[j] >= 0 && lengths[j] <= INT64_MAX - at &&
               at - start <= (int64_t)1 << 30) {
            iov[k].iov_base = addresses[j];
            iov[k].iov_len = (size_t)lengths[j];
            at += lengths[j];
            j++;
            k++;
        }
        if (k == 0) /* a negative offset or length, or a range past the largest offset */
            return i;
        ssize_t got;
        do
            got = k == 1 ? pread(fd, iov[0].iov_base, iov[0].iov_len, (off_t)start) : preadv(fd, iov, k, (off_t)start);
        while (got < 0 && errno == EINTR);
        if (got != at - start) /* short (a signal, a file cut) or failed: range by range, to find which */
            for (int64_t r = i; r < j; r++)
                if (qb_read_whole(fd, addresses[r], lengths[r], offsets[r]) != 0)
                    return r;
        i = j;
    }
    return -1;
}
#endif
