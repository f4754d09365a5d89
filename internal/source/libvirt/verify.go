package libvirt

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"

	"github.com/kura-backup/kura/internal/guest"
)

// IsolatedDefinition makes definition x (RestoreDefinition's output) fit
// for a verification boot: no network interfaces, no host devices and no
// remote display, and a VGA video device so that the console can be
// captured.
func IsolatedDefinition(x string) (string, error) {
	var root xmlNode
	if err := xml.Unmarshal([]byte(x), &root); err != nil {
		return "", fmt.Errorf("the domain XML does not parse: %w", err)
	}
	devices := root.child("devices", false)
	if devices == nil {
		return "", errors.New("the domain XML has no <devices>")
	}
	devices.removeChildren("interface", "hostdev", "graphics", "redirdev", "smartcard")
	if devices.child("video", false) == nil {
		video := xmlNode{XMLName: xml.Name{Local: "video"}}
		model := xmlNode{XMLName: xml.Name{Local: "model"}}
		model.attrSet("type", "vga")
		video.Nodes = []xmlNode{model}
		devices.Nodes = append(devices.Nodes, video)
	}
	out, err := xml.MarshalIndent(&root, "", "  ")
	if err != nil {
		return "", err
	}
	return string(out) + "\n", nil
}

// ExecResult is the outcome of a command run in a guest.
type ExecResult struct {
	Exit   int
	Output string // stdout then stderr
}

// GuestExec runs /bin/sh -c command in domain name through its guest
// agent and waits (within ctx) for it to end.
func (c *Conn) GuestExec(ctx context.Context, name, command string) (ExecResult, error) {
	dom, err := c.lookup(ctx, name)
	if err != nil {
		return ExecResult{}, err
	}
	call := func(req any, out any) error {
		b, _ := json.Marshal(req)
		reply, err := guest.Call(ctx, func() (golibvirt.OptString, error) {
			return c.l.QEMUDomainAgentCommand(dom, string(b), 10, 0)
		})
		if err != nil {
			return err
		}
		if len(reply) == 0 {
			return errors.New("libvirt returned no reply")
		}
		var env struct {
			Return json.RawMessage `json:"return"`
		}
		if err := json.Unmarshal([]byte(reply[0]), &env); err != nil {
			return err
		}
		return json.Unmarshal(env.Return, out)
	}
	var started struct {
		PID int `json:"pid"`
	}
	err = call(map[string]any{"execute": "guest-exec", "arguments": map[string]any{
		"path": "/bin/sh", "arg": []string{"-c", command}, "capture-output": true}}, &started)
	if err != nil {
		return ExecResult{}, fmt.Errorf("running %q in %s: %w", command, name, err)
	}
	for {
		var st struct {
			Exited   bool   `json:"exited"`
			ExitCode int    `json:"exitcode"`
			Signal   int    `json:"signal"`
			OutData  string `json:"out-data"`
			ErrData  string `json:"err-data"`
		}
		if err := call(map[string]any{"execute": "guest-exec-status", "arguments": map[string]any{"pid": started.PID}}, &st); err != nil {
			return ExecResult{}, fmt.Errorf("waiting for %q in %s: %w", command, name, err)
		}
		if st.Exited {
			out, _ := base64.StdEncoding.DecodeString(st.OutData)
			errOut, _ := base64.StdEncoding.DecodeString(st.ErrData)
			code := st.ExitCode
			if st.Signal != 0 {
				code = 128 + st.Signal
			}
			return ExecResult{Exit: code, Output: string(out) + string(errOut)}, nil
		}
		select {
		case <-ctx.Done():
			return ExecResult{}, fmt.Errorf("%q in %s did not end: %w", command, name, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Screenshot captures the console of domain name as a PNG image. QEMU
// writes it (QMP screendump, through libvirt) as a PPM file into dir,
// which QEMU must be able to write; it is converted and removed.
func (c *Conn) Screenshot(ctx context.Context, name, dir string) ([]byte, error) {
	dom, err := c.lookup(ctx, name)
	if err != nil {
		return nil, err
	}
	path := filepath.Join(dir, "screendump.ppm")
	defer os.Remove(path)
	cmd, _ := json.Marshal(map[string]any{"execute": "screendump", "arguments": map[string]any{"filename": path}})
	if _, err := rpc(ctx, c, func() (string, error) { return c.l.QEMUDomainMonitorCommand(dom, string(cmd), 0) }); err != nil {
		return nil, fmt.Errorf("taking a screenshot of %s: %w", name, err)
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("screenshot of %s: %w", name, err)
	}
	defer f.Close()
	img, err := decodePPM(f)
	if err != nil {
		return nil, fmt.Errorf("screenshot of %s: %w", name, err)
	}
	var out bytes.Buffer
	if err := png.Encode(&out, img); err != nil {
		return nil, err
	}
	return out.Bytes(), nil
}

// decodePPM reads a binary PPM (P6) image, as QEMU's screendump writes.
func decodePPM(r io.Reader) (image.Image, error) {
	br := bufio.NewReader(r)
	var fields []int
	magic, err := ppmToken(br)
	if err != nil || magic != "P6" {
		return nil, fmt.Errorf("not a binary PPM image (%q, %v)", magic, err)
	}
	for len(fields) < 3 {
		tok, err := ppmToken(br)
		if err != nil {
			return nil, fmt.Errorf("PPM header: %w", err)
		}
		v, err := strconv.Atoi(tok)
		if err != nil || v <= 0 || v > 1<<14 {
			return nil, fmt.Errorf("PPM header value %q", tok)
		}
		fields = append(fields, v)
	}
	w, h, maxv := fields[0], fields[1], fields[2]
	if maxv > 255 {
		return nil, fmt.Errorf("PPM with 16-bit samples is not supported")
	}
	pix := make([]byte, w*h*3)
	if _, err := io.ReadFull(br, pix); err != nil {
		return nil, fmt.Errorf("PPM pixels: %w", err)
	}
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	for i := 0; i < w*h; i++ {
		img.Set(i%w, i/w, color.RGBA{pix[3*i], pix[3*i+1], pix[3*i+2], 255})
	}
	return img, nil
}

// ppmToken reads one whitespace-separated header token, skipping
// comments, and the single whitespace byte after it.
func ppmToken(br *bufio.Reader) (string, error) {
	var tok []byte
	for {
		b, err := br.ReadByte()
		if err != nil {
			return "", err
		}
		switch {
		case b == '#' && len(tok) == 0:
			if _, err := br.ReadString('\n'); err != nil {
				return "", err
			}
		case b == ' ' || b == '\t' || b == '\n' || b == '\r':
			if len(tok) > 0 {
				return string(tok), nil
			}
		default:
			tok = append(tok, b)
			if len(tok) > 16 {
				return "", errors.New("PPM header token too long")
			}
		}
	}
}
