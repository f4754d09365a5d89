package guestfs

import "syscall"

type syscallStat = syscall.Stat_t
