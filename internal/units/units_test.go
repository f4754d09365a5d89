package units

import (
	"errors"
	"strings"
	"testing"
)

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		err  string // part of the error; "" for success
	}{
		{"0", 0, ""},
		{"512", 512, ""},
		{"512B", 512, ""},
		{"256K", 256 << 10, ""},
		{"256k", 256 << 10, ""},
		{"256KiB", 256 << 10, ""},
		{"256kib", 256 << 10, ""},
		{"1M", 1 << 20, ""},
		{"1MiB", 1 << 20, ""},
		{"1MB", 1000000, ""},
		{"1mb", 1000000, ""},
		{"2G", 2 << 30, ""},
		{"2GiB", 2 << 30, ""},
		{"2GB", 2e9, ""},
		{"3T", 3 << 40, ""},
		{"3TiB", 3 << 40, ""},
		{"3TB", 3e12, ""},
		{"1.5G", 3 << 29, ""},
		{"1.5GB", 1.5e9, ""},
		{"0.5K", 512, ""},
		{" 64 KiB ", 64 << 10, ""},
		{"8388607T", 8388607 << 40, ""},
		{"", 0, "no number"},
		{"MB", 0, "no number"},
		{"-1", 0, "negative"},
		{"-1M", 0, "negative"},
		{"1MBx", 0, "unknown unit"},
		{"1 M B", 0, "unknown unit"},
		{"1P", 0, "unknown unit"},
		{"1Mb/s", 0, "unknown unit"},
		{"1e6", 0, "unknown unit"},
		{"0x10", 0, "unknown unit"},
		{"1.2.3", 0, "malformed"},
		{"1.", 0, "malformed"},
		{".", 0, "malformed"},
		{"1.1B", 0, "whole number of bytes"},
		{"0.3K", 0, "whole number of bytes"},
		{"8388608T", 0, "too large"},
		{"99999999999999999999", 0, "too large"},
	} {
		got, err := ParseSize(tc.in)
		if tc.err == "" {
			if err != nil || got != tc.want {
				t.Errorf("ParseSize(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
			}
			continue
		}
		if err == nil || !errors.Is(err, ErrSyntax) || !strings.Contains(err.Error(), tc.err) || !strings.Contains(err.Error(), "KiB") {
			t.Errorf("ParseSize(%q) = %d, %v; want an error with %q naming the units", tc.in, got, err, tc.err)
		}
	}
}

func TestParseRate(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		err  string
	}{
		{"50MiB", 50 << 20, ""},
		{"50MiB/s", 50 << 20, ""},
		{"200MB/s", 200e6, ""},
		{"1048576", 1 << 20, ""},
		{"0", 0, "more than 0"},
		{"0MiB/s", 0, "more than 0"},
		{"fast", 0, "not a rate"},
		{"1MB/h", 0, "not a rate"},
		{"-5M", 0, "not a rate"},
	} {
		got, err := ParseRate(tc.in)
		if tc.err == "" {
			if err != nil || got != tc.want {
				t.Errorf("ParseRate(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("ParseRate(%q) = %d, %v; want an error with %q", tc.in, got, err, tc.err)
		}
	}
}
