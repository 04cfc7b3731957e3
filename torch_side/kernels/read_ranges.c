/* Many byte ranges of one file read into memory in one call.
 *
 * qbridge's checkpoint reader gathers a group of weights of one shape (a DeepSeek-V3 layer's 256 experts' up
 * projections, say) into the rows of one host buffer. Those tensors lie apart in their file (the other
 * projections' tensors between them), so each needs a read of its own. Done from Python, each read is a call
 * that gives up the interpreter lock and takes it back, and taking it back waits for the thread that loads
 * the checkpoint; here the reads of a whole group run in one loop while the calling thread (called through
 * ctypes) holds no lock at all.
 *
 * Built with the CPU decode (cpu_4bit.c) into one library by torch_side/_native.py.
 */
#define _XOPEN_SOURCE 700
#include <errno.h>
#include <stdint.h>
#include <unistd.h>

/* Reads the bytes [offsets[i], offsets[i] + lengths[i]) of the open file `fd` into dests[i], for i in
 * [0, n), in that order, with positioned reads (the file's position is left alone, so threads may read one
 * file together). A read that returns part of a range is continued (Linux reads at most about 2 GiB at a
 * time); one interrupted by a signal is repeated.
 *
 * Returns -1 when every range was read whole. Otherwise the index i of the first range that was not, with
 * *got the bytes of it read and *error the read's errno (0: the file ended first); the ranges after it are
 * not read. A negative offset or length is EINVAL at its range, nothing of it read; a negative n is EINVAL at
 * range 0. */
int64_t qb_read_ranges(int fd, int64_t n, const int64_t *offsets, const int64_t *lengths, void *const *dests,
                       int64_t *got, int *error) {
    if (n < 0) {
        *got = 0;
        *error = EINVAL;
        return 0;
    }
    for (int64_t i = 0; i < n; i++) {
        int64_t done = 0;
        if (offsets[i] < 0 || lengths[i] < 0) {
            *got = 0;
            *error = EINVAL;
            return i;
        }
        while (done < lengths[i]) {
            ssize_t r = pread(fd, (char *)dests[i] + done, (size_t)(lengths[i] - done), (off_t)(offsets[i] + done));
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0) {
                *got = done;
                *error = r < 0 ? errno : 0;
                return i;
            }
            done += r;
        }
    }
    return -1;
}
