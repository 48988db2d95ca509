/* xxhash64.h: xxHash64's primes, round and four-lane walk, shared by the
 * page hashes of ksm.c (wp ksm estimate's fingerprints) and dedupe.c
 * (dedupe's scanner). Static inline, so each .c has its own copy; there is
 * no xxhash64.c, so cffi's cdef does not read this header. */
#ifndef WP_XXHASH64_H
#define WP_XXHASH64_H
#include <stdint.h>
#include <string.h>

static const uint64_t P1 = 11400714785074694791ULL;
static const uint64_t P2 = 14029467366897019727ULL;
static const uint64_t P3 = 1609587929392839161ULL;
static const uint64_t P4 = 9650029242287828579ULL;
static const uint64_t P5 = 2870177450012600261ULL;

static inline uint64_t rotl(uint64_t x, int r)
{
	return (x << r) | (x >> (64 - r));
}

static inline uint64_t round64(uint64_t acc, uint64_t in)
{
	acc += in * P2;
	acc = rotl(acc, 31);
	return acc * P1;
}

static inline uint64_t avalanche(uint64_t h)
{
	h ^= h >> 33;
	h *= P2;
	h ^= h >> 29;
	h *= P3;
	h ^= h >> 32;
	return h;
}

/* Runs xxHash64's round over words 64-bit words of w (a multiple of 4 is
 * read) on four lanes v[0..3], which start as xxHash64's seed-0 state.
 * Returns the OR of every word read: 0 for a page of zero bytes. */
static inline uint64_t xxh64_lanes(const uint64_t *w, uint64_t words, uint64_t v[4])
{
	uint64_t any = 0;
	v[0] = P1 + P2;
	v[1] = P2;
	v[2] = 0;
	v[3] = -P1;
	for (uint64_t i = 0; i + 4 <= words; i += 4) {
		uint64_t a, b, c, d;
		memcpy(&a, w + i, 8);
		memcpy(&b, w + i + 1, 8);
		memcpy(&c, w + i + 2, 8);
		memcpy(&d, w + i + 3, 8);
		any |= a | b | c | d;
		v[0] = round64(v[0], a);
		v[1] = round64(v[1], b);
		v[2] = round64(v[2], c);
		v[3] = round64(v[3], d);
	}
	return any;
}

#endif
