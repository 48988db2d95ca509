/* A target that never sleeps: its main thread spins in user mode in an asm
 * loop that keeps known values in every general register it can (all but
 * rsp, rax and rcx) and checks them on every turn, so a register not put
 * back exactly after an attach is caught. Every 2^22 turns it polls stdin:
 * "q" prints "ok <turns>" or "FAIL <turn>" and exits. */
#define _GNU_SOURCE
#include <poll.h>
#include <stdio.h>
#include <unistd.h>

/* Spins n turns; returns 0, or 1 if a register changed. */
static long spin(long n)
{
	long bad;
	__asm__ volatile(
		"mov $0x1111111111111111, %%rbx\n\t"
		"mov $0x2222222222222222, %%rdx\n\t"
		"mov $0x3333333333333333, %%rsi\n\t"
		"mov $0x4444444444444444, %%rdi\n\t"
		"mov $0x0808080808080808, %%r8\n\t"
		"mov $0x0909090909090909, %%r9\n\t"
		"mov $0x1010101010101010, %%r10\n\t"
		"mov $0x1111111111111112, %%r11\n\t"
		"mov $0x1212121212121212, %%r12\n\t"
		"mov $0x1313131313131313, %%r13\n\t"
		"mov $0x1414141414141414, %%r14\n\t"
		"mov $0x1515151515151515, %%r15\n"
		"1:\n\t"
		"mov $0x1111111111111111, %%rax\n\t cmp %%rax, %%rbx\n\t jne 8f\n\t"
		"mov $0x2222222222222222, %%rax\n\t cmp %%rax, %%rdx\n\t jne 8f\n\t"
		"mov $0x3333333333333333, %%rax\n\t cmp %%rax, %%rsi\n\t jne 8f\n\t"
		"mov $0x4444444444444444, %%rax\n\t cmp %%rax, %%rdi\n\t jne 8f\n\t"
		"mov $0x0808080808080808, %%rax\n\t cmp %%rax, %%r8\n\t jne 8f\n\t"
		"mov $0x0909090909090909, %%rax\n\t cmp %%rax, %%r9\n\t jne 8f\n\t"
		"mov $0x1010101010101010, %%rax\n\t cmp %%rax, %%r10\n\t jne 8f\n\t"
		"mov $0x1111111111111112, %%rax\n\t cmp %%rax, %%r11\n\t jne 8f\n\t"
		"mov $0x1212121212121212, %%rax\n\t cmp %%rax, %%r12\n\t jne 8f\n\t"
		"mov $0x1313131313131313, %%rax\n\t cmp %%rax, %%r13\n\t jne 8f\n\t"
		"mov $0x1414141414141414, %%rax\n\t cmp %%rax, %%r14\n\t jne 8f\n\t"
		"mov $0x1515151515151515, %%rax\n\t cmp %%rax, %%r15\n\t jne 8f\n\t"
		"dec %%rcx\n\t jnz 1b\n\t"
		"xor %%eax, %%eax\n\t jmp 9f\n"
		"8: mov $1, %%eax\n"
		"9:\n\t"
		: "=a"(bad), "+c"(n)
		:
		: "rbx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
		  "r15", "memory", "cc");
	return bad;
}

int main(void)
{
	long turns = 0;
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready\n");
	for (;;) {
		if (spin(1L << 22)) {
			printf("FAIL %ld\n", turns);
			return 1;
		}
		turns++;
		struct pollfd p = {0, POLLIN, 0};
		if (poll(&p, 1, 0) == 1)
			break;
	}
	printf("ok %ld\n", turns);
	return 0;
}
