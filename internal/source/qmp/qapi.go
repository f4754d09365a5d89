package qmp

import (
	"context"
	"errors"
	"fmt"
	"strings"
)

// The parts of QEMU's QAPI replies the driver reads.

// blockInfo is one entry of query-block.
type blockInfo struct {
	Device    string         `json:"device"`
	QDev      string         `json:"qdev"`
	Removable bool           `json:"removable"`
	Inserted  *blockInserted `json:"inserted"`
}

// blockInserted is a node as query-block and query-named-block-nodes
// describe it (BlockDeviceInfo).
type blockInserted struct {
	NodeName     string            `json:"node-name"`
	Drv          string            `json:"drv"`
	File         string            `json:"file"`
	RO           bool              `json:"ro"`
	Image        imageInfo         `json:"image"`
	DirtyBitmaps []dirtyBitmapInfo `json:"dirty-bitmaps"`
}

type imageInfo struct {
	Filename        string `json:"filename"`
	BackingFilename string `json:"backing-filename"`
	Format          string `json:"format"`
	VirtualSize     int64  `json:"virtual-size"`
	FormatSpecific  *struct {
		Type string `json:"type"`
		Data struct {
			Compat string `json:"compat"` // qcow2: "0.10" (v2) or "1.1" (v3)
		} `json:"data"`
	} `json:"format-specific"`
}

// qcow2v2 reports whether the image is a qcow2 version 2 (compat=0.10)
// image, which cannot store persistent dirty bitmaps.
func (i imageInfo) qcow2v2() bool {
	return i.FormatSpecific != nil && i.FormatSpecific.Type == "qcow2" && i.FormatSpecific.Data.Compat == "0.10"
}

// dirtyBitmapInfo is BlockDirtyInfo.
type dirtyBitmapInfo struct {
	Name         string `json:"name"`
	Recording    bool   `json:"recording"`
	Persistent   bool   `json:"persistent"`
	Busy         bool   `json:"busy"`
	Inconsistent bool   `json:"inconsistent"`
	Granularity  int64  `json:"granularity"`
	Count        int64  `json:"count"`
}

type jobInfo struct {
	ID     string `json:"id"`
	Type   string `json:"type"`
	Status string `json:"status"`
	Error  string `json:"error"`
}

type exportInfo struct {
	ID           string `json:"id"`
	Type         string `json:"type"`
	NodeName     string `json:"node-name"`
	ShuttingDown bool   `json:"shutting-down"`
}

type statusInfo struct {
	Status  string `json:"status"`
	Running bool   `json:"running"`
}

type qomProp struct {
	Name string `json:"name"`
	Type string `json:"type"`
}

type chardevInfo struct {
	Label    string `json:"label"`
	Filename string `json:"filename"`
}

// isNotFound reports whether QEMU answered that the object a command named
// (node, job, export, bitmap) does not exist.
func isNotFound(err error) bool {
	var qe *Error
	if !errors.As(err, &qe) {
		return false
	}
	if qe.Class == "DeviceNotFound" {
		return true
	}
	d := strings.ToLower(qe.Desc)
	for _, s := range []string{"not found", "cannot find", "failed to find", "no such", "doesn't exist", "does not exist", "not running", "no job with id", "not active"} {
		if strings.Contains(d, s) {
			return true
		}
	}
	return false
}

func queryBlock(ctx context.Context, c *Client) ([]blockInfo, error) {
	var bs []blockInfo
	if err := c.Execute(ctx, "query-block", nil, &bs); err != nil {
		return nil, fmt.Errorf("listing the VM's disks: %w", err)
	}
	return bs, nil
}

func queryNodes(ctx context.Context, c *Client) ([]blockInserted, error) {
	var ns []blockInserted
	if err := c.Execute(ctx, "query-named-block-nodes", map[string]any{"flat": true}, &ns); err != nil {
		return nil, fmt.Errorf("listing the VM's block nodes: %w", err)
	}
	return ns, nil
}

func queryJobs(ctx context.Context, c *Client) ([]jobInfo, error) {
	var js []jobInfo
	if err := c.Execute(ctx, "query-jobs", nil, &js); err != nil {
		return nil, fmt.Errorf("listing the VM's block jobs: %w", err)
	}
	return js, nil
}

func queryExports(ctx context.Context, c *Client) ([]exportInfo, error) {
	var es []exportInfo
	if err := c.Execute(ctx, "query-block-exports", nil, &es); err != nil {
		return nil, fmt.Errorf("listing the VM's block exports: %w", err)
	}
	return es, nil
}

func queryStatus(ctx context.Context, c *Client) (statusInfo, error) {
	var st statusInfo
	if err := c.Execute(ctx, "query-status", nil, &st); err != nil {
		return st, fmt.Errorf("asking the VM's run state: %w", err)
	}
	return st, nil
}
