/* A page-fault scalability loop in the style of will-it-scale's
 * page_fault1 (tests/page_fault1.c there): each thread maps 128 MiB of
 * private anonymous memory, writes one byte per page (a fresh page fault
 * each), unmaps it, and counts the pages. wp bench workloads runs it for
 * `seconds` with 1 or 2 threads; it stands in for reaim, which Debian does
 * not package (mmtests dropped it as bit-rotted).
 *
 * Output, one line: pages=N seconds=S pages_per_s=R max_iter_ms=M
 * median_iter_ms=D (an iteration is one map-write-unmap of 128 MiB; the
 * longest one bounds the longest stall a thread saw).
 *
 * usage: pagefault THREADS SECONDS
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEMSIZE (128UL << 20)
#define MAXITER 100000

static volatile int stop;
static double seconds;

struct worker {
    pthread_t th;
    unsigned long pages;
    unsigned long iters;
    double *iter_ms;
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *run(void *arg)
{
    struct worker *w = arg;
    long psize = sysconf(_SC_PAGESIZE);
    while (!stop) {
        double t = now();
        char *c = mmap(NULL, MEMSIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (c == MAP_FAILED) {
            perror("mmap");
            exit(1);
        }
        for (unsigned long off = 0; off < MEMSIZE && !stop; off += psize) {
            c[off] = 1;
            w->pages++;
        }
        munmap(c, MEMSIZE);
        if (w->iters < MAXITER)
            w->iter_ms[w->iters] = (now() - t) * 1e3;
        w->iters++;
    }
    return NULL;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s THREADS SECONDS\n", argv[0]);
        return 2;
    }
    int n = atoi(argv[1]);
    seconds = atof(argv[2]);
    struct worker *ws = calloc(n, sizeof(*ws));
    double t0 = now();
    for (int i = 0; i < n; i++) {
        ws[i].iter_ms = calloc(MAXITER, sizeof(double));
        pthread_create(&ws[i].th, NULL, run, &ws[i]);
    }
    usleep((useconds_t)(seconds * 1e6));
    stop = 1;
    unsigned long pages = 0, iters = 0;
    for (int i = 0; i < n; i++) {
        pthread_join(ws[i].th, NULL);
        pages += ws[i].pages;
    }
    double el = now() - t0;
    /* every complete iteration of every thread (the last, cut short, is out) */
    double *all = calloc((size_t)n * MAXITER, sizeof(double));
    for (int i = 0; i < n; i++)
        for (unsigned long j = 0; j + 1 < ws[i].iters && j < MAXITER; j++)
            all[iters++] = ws[i].iter_ms[j];
    qsort(all, iters, sizeof(double), cmp);
    printf("pages=%lu seconds=%.3f pages_per_s=%.0f max_iter_ms=%.3f median_iter_ms=%.3f\n",
           pages, el, pages / el, iters ? all[iters - 1] : 0.0, iters ? all[iters / 2] : 0.0);
    return 0;
}
