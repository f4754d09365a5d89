//go:build !linux

package backend

func adviseHugePages([]byte) {}
