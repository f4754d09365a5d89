//go:build !linux

package crypt

func prepareKDFMemory(int) {}

func releaseKDFMemory() {}
