// SPDX-License-Identifier: GPL-2.0
/*
 * Test rootkit for the introspection SD's tests: replaces one entry of
 * sys_call_table (a classic syscall hook) with a function of this module
 * that calls the original, and puts the original back on unload.
 * The table's address comes from /proc/kallsyms (table=0x...).
 */
#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/ptrace.h>
#include <asm/special_insns.h>
#include <asm/processor-flags.h>

static unsigned long table;
module_param(table, ulong, 0400);
static int nr = 110; /* getppid */
module_param(nr, int, 0400);

typedef long (*syscall_fn)(const struct pt_regs *);
static unsigned long original;

static long hooked(const struct pt_regs *regs)
{
	return ((syscall_fn)original)(regs);
}

static void poke(unsigned long value)
{
	unsigned long *slot = (unsigned long *)table + nr;
	unsigned long cr0;

	preempt_disable();
	cr0 = read_cr0();
	/* sys_call_table is read-only: clear CR0.WP around the write. */
	asm volatile("mov %0, %%cr0" : : "r"(cr0 & ~X86_CR0_WP) : "memory");
	WRITE_ONCE(*slot, value);
	asm volatile("mov %0, %%cr0" : : "r"(cr0) : "memory");
	preempt_enable();
}

static int __init hook_init(void)
{
	if (!table || nr < 0 || nr > 512)
		return -EINVAL;
	original = ((unsigned long *)table)[nr];
	poke((unsigned long)hooked);
	pr_info("ssc_hook: sys_call_table[%d] %lx -> %px\n", nr, original, hooked);
	return 0;
}

static void __exit hook_exit(void)
{
	poke(original);
	pr_info("ssc_hook: sys_call_table[%d] restored\n", nr);
}

module_init(hook_init);
module_exit(hook_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("ssc test: hooks a sys_call_table entry");
