// Package s3 stores repository objects in an S3-compatible object store:
// a bucket, and a key prefix in it, on AWS S3 or any server that speaks
// its API (MinIO, Ceph RGW, SeaweedFS, versitygw, Garage, …).
//
// It implements backend.Backend as its contract says:
//
//   - Save is one PUT (atomic on every S3 server) or, above a threshold
//     (Config.MultipartThreshold, 64 MiB by default: pack files of the
//     default sizes, 16 MiB in a directory and 24 MiB on S3, up to 48 MiB
//     are one PUT), a multipart upload whose parts go up in parallel and
//     which is aborted when any part fails. Every PUT carries a checksum
//     of its bytes in a signed header, which the server checks before it
//     stores anything: the CRC32C (x-amz-checksum-crc32c, computed by the
//     CPU's own instruction) when the server is seen to check it (one
//     probe per process, crcVerified), else the MD5 (Content-MD5, which
//     every server checks; and for multipart parts). The body itself is
//     not hashed into the signature (UNSIGNED-PAYLOAD), over HTTPS as over
//     plain HTTP: the signed checksum already ties the bytes to the
//     request, and every object is sealed (AES-GCM) anyway. The SHA-256
//     and the MD5 each cost about a tenth of a backup's CPU
//     (docs/BENCHMARKS.md, Kura on S3).
//   - Names the repository writes once (backend.WriteOnce: packs, index
//     files, snapshots, keys, the config) are saved with If-None-Match: *,
//     so that nothing, a bug or a second writer, replaces them: saving the
//     same bytes again (a retried Save) succeeds, other bytes fail with
//     backend.ErrExists. Servers that do not implement conditional writes
//     get plain PUTs. Lock records and pending deletions keep replace
//     semantics.
//   - Load is a ranged GET; since S3 clamps a range that runs past the
//     end of the object, the object's size in Content-Range is checked
//     and such a range fails with backend.ErrTruncated. LoadInto reads
//     into the caller's buffer (restores reuse their memory).
//   - List pages through ListObjectsV2; Remove and Stat are HEAD and
//     DELETE (Remove of a missing object fails with backend.ErrNotFound,
//     which S3's DELETE does not say by itself).
//   - Errors name the bucket and key; NoSuchKey is backend.ErrNotFound, a
//     full bucket or quota backend.ErrNoSpace, a missing bucket or refused
//     credentials an error that says what to do; server errors worth
//     repeating (500, 503, SlowDown, a connection reset, a timeout) are
//     marked backend.Transient for internal/backend/retry. The client's
//     own retries are off: that decorator owns retrying.
//
// Incomplete multipart uploads of killed processes are the S3 form of a
// local backend's temporary files: RemoveStaleTemp (backend.TempCleaner,
// called by prune) aborts those older than backend.StaleTempAge.
//
// Object lock (lock.go, backend.Locker): on a bucket with object lock,
// every write-once Save carries a retention date (x-amz-object-lock-*
// headers on the PUT or the multipart upload), prune moves the dates of
// what the repository still needs forward and purges the hidden
// versions of what it removed once their retention ends. A view of the
// repository as of an earlier time (asof.go) reads each key's version of
// that time: how a repository comes back after someone deleted or
// overwrote its objects.
//
// Why minio-go (github.com/minio/minio-go/v7) and not aws-sdk-go-v2: it is
// one module with a small dependency tree where the AWS SDK is a family
// of modules (smithy, per-service packages) several times larger; it is
// written for, and tested against, S3-compatible servers as much as AWS
// (path-style addressing, servers without region endpoints), which is
// where backups to one's own object store live; and its low-level Core
// API exposes exactly the calls a backend needs (PutObject with our
// Content-MD5 and SHA-256, multipart parts, ranged GET with the response
// headers) without a transfer manager in between. What it lacks is
// retries we can control per call, which internal/backend/retry gives.
package s3

import (
	"bytes"
	"context"
	"crypto/md5"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"path"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"golang.org/x/sync/errgroup"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/crypt"
)

// Defaults of Config.
const (
	DefaultMultipartThreshold = 64 << 20
	DefaultPartSize           = 16 << 20
	DefaultPartConcurrency    = 4
	// MinPartSize is the smallest part S3 accepts but for the last.
	MinPartSize = 5 << 20
)

// Config says where the repository is and how to reach it.
type Config struct {
	// Endpoint is the server's URL, "https://s3.example.com:9000" (a path
	// is not allowed: the bucket is named apart).
	Endpoint string
	// Bucket holds the repository, under Prefix ("" for the whole bucket,
	// else a path without leading or trailing slash: "kura/web").
	Bucket, Prefix string
	// Region of the bucket; empty lets the client find it (AWS) or use
	// us-east-1 (other servers).
	Region string
	// VirtualHost addresses the bucket as a host name
	// (bucket.s3.example.com) instead of a path (s3.example.com/bucket).
	// Path style is the default: S3-compatible servers serve it without
	// DNS set-up. AWS endpoints are reached as AWS wants either way.
	VirtualHost bool
	// Credentials sign the requests (see FromEnv).
	Credentials *credentials.Credentials
	// CAFile, a PEM file, is trusted besides the system's certificate
	// authorities (a server with a self-signed certificate).
	CAFile string
	// Transport, when set, carries the requests instead of one built
	// here (tests wrap the default one); CAFile is then ignored.
	Transport http.RoundTripper
	// MultipartThreshold is the object size above which Save uploads in
	// parts of PartSize, PartConcurrency at a time.
	MultipartThreshold int64
	PartSize           int64
	PartConcurrency    int
	// Logger receives debug lines; nil discards them.
	Logger *slog.Logger
	// AsOf, when set, opens a read-only view of the repository as it was
	// at that time, from the bucket's object versions (asof.go).
	AsOf time.Time
}

// Backend is a bucket and prefix on an S3-compatible server.
type Backend struct {
	cfg  Config
	core minio.Core
	// signPayload signs the SHA-256 of every upload's bytes; off (tests
	// turn it on to show the server checks Content-MD5 either way).
	signPayload bool
	// staleAge is RemoveStaleTemp's age of an abandoned upload.
	staleAge time.Duration
	prefix   string // "" or "kura/web/"
	where    string // for Location
	log      *slog.Logger
	// noConditional is set once the server said it does not implement
	// If-None-Match on PUT: write-once names are then saved plainly.
	noConditional atomic.Bool
	// crcMode says whether single PUTs carry a CRC32C instead of an MD5
	// (crcVerified); crcProbe makes one goroutine probe.
	crcMode  atomic.Int32
	crcProbe sync.Mutex
	// lock is the retention every write-once Save carries (SetRetention).
	lock atomic.Pointer[lockPolicy]
	// asOf is the view of Config.AsOf, or nil.
	asOf *asOfView
}

// ErrAccess is returned (wrapped) when the server refuses the
// credentials or the request's permissions.
var ErrAccess = errors.New("the S3 server refused access: check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with a credentials file) and that they may read and write the bucket")

// ErrNoBucket is returned (wrapped) when the bucket does not exist.
var ErrNoBucket = errors.New("the bucket does not exist: create it (for example `aws s3 mb s3://BUCKET`, or the server's console), or correct the repository location")

// Open checks the configuration, connects and checks that the bucket
// exists and the credentials are accepted (one request), so that a wrong
// location or key fails here with a message that says so.
func Open(ctx context.Context, cfg Config) (*Backend, error) {
	u, err := url.Parse(cfg.Endpoint)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("S3 endpoint %q: want http://HOST[:PORT] or https://HOST[:PORT]", cfg.Endpoint)
	}
	if u.User != nil {
		return nil, errors.New("S3 endpoint: credentials do not go into the location (it shows in process lists and logs): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
	}
	if strings.Trim(u.Path, "/") != "" {
		return nil, fmt.Errorf("S3 endpoint %q: the bucket and prefix are given apart, not in the endpoint", cfg.Endpoint)
	}
	if cfg.Bucket == "" {
		return nil, errors.New("S3 location: no bucket given: s3:https://HOST[:PORT]/BUCKET[/PREFIX]")
	}
	cfg.Prefix = strings.Trim(cfg.Prefix, "/")
	if cfg.Prefix != "" && path.Clean(cfg.Prefix) != cfg.Prefix || strings.Contains(cfg.Prefix, "..") {
		return nil, fmt.Errorf("S3 location: prefix %q is not a clean path", cfg.Prefix)
	}
	if cfg.Credentials == nil {
		return nil, errors.New("S3 location: no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with a credentials file")
	}
	if cfg.MultipartThreshold <= 0 {
		cfg.MultipartThreshold = DefaultMultipartThreshold
	}
	if cfg.PartSize <= 0 {
		cfg.PartSize = DefaultPartSize
	}
	if cfg.PartSize < MinPartSize {
		return nil, fmt.Errorf("S3 part size %d: S3 takes parts of at least %d bytes", cfg.PartSize, MinPartSize)
	}
	if cfg.PartConcurrency <= 0 {
		cfg.PartConcurrency = DefaultPartConcurrency
	}
	secure := u.Scheme == "https"
	tr := cfg.Transport
	if tr == nil {
		if tr, err = transport(secure, cfg.CAFile); err != nil {
			return nil, err
		}
	}
	lookup := minio.BucketLookupPath
	if cfg.VirtualHost {
		lookup = minio.BucketLookupDNS
	}
	region := cfg.Region
	if strings.HasSuffix(u.Hostname(), ".amazonaws.com") {
		lookup = minio.BucketLookupAuto
	} else if region == "" {
		// Other servers rarely care; asking them (GetBucketLocation) would
		// cost a request, and some do not answer it.
		region = "us-east-1"
	}
	client, err := minio.New(u.Host, &minio.Options{
		Creds:        cfg.Credentials,
		Secure:       secure,
		Transport:    tr,
		Region:       region,
		BucketLookup: lookup,
		MaxRetries:   1, // internal/backend/retry retries, with a log line
	})
	if err != nil {
		return nil, fmt.Errorf("S3 endpoint %s: %w", cfg.Endpoint, err)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	b := &Backend{cfg: cfg, core: minio.Core{Client: client}, staleAge: backend.StaleTempAge, log: log}
	b.where = "s3:" + u.Scheme + "://" + u.Host + "/" + cfg.Bucket
	if cfg.Prefix != "" {
		b.prefix = cfg.Prefix + "/"
		b.where += "/" + cfg.Prefix
	}
	if !cfg.AsOf.IsZero() {
		b.asOf = &asOfView{at: cfg.AsOf, ids: map[string]string{}}
		b.where += "?as-of=" + cfg.AsOf.UTC().Format(time.RFC3339)
	}
	if err := b.check(ctx); err != nil {
		return nil, err
	}
	return b, nil
}

// check lists one key of the prefix: the bucket must exist and the
// credentials be accepted. A GET, not the HEAD of BucketExists: a HEAD's
// answer has no body, and some servers (versitygw) answer an unknown
// access key with a 404 that a HEAD cannot tell from a missing bucket.
func (b *Backend) check(ctx context.Context) error {
	lctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var err error
	first := true
	for oi := range b.core.Client.ListObjects(lctx, b.cfg.Bucket, minio.ListObjectsOptions{Prefix: b.prefix, MaxKeys: 1}) {
		if first {
			err = oi.Err // what comes after is the cancel's
			first = false
		}
		cancel() // one answer is enough
	}
	if err == nil {
		err = ctx.Err()
	}
	return b.wrap("open", "", err)
}

// transport is minio-go's default transport, trusting caFile too.
func transport(secure bool, caFile string) (http.RoundTripper, error) {
	tr, err := minio.DefaultTransport(secure)
	if err != nil {
		return nil, err
	}
	if caFile == "" {
		return tr, nil
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("S3 CA file: %w", err)
	}
	pool, err := x509.SystemCertPool()
	if err != nil {
		pool = x509.NewCertPool()
	}
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("S3 CA file %s: no PEM certificate in it", caFile)
	}
	if tr.TLSClientConfig == nil {
		tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	tr.TLSClientConfig.RootCAs = pool
	return tr, nil
}

// Location implements backend.Backend: "s3:https://host:port/bucket/prefix",
// never a credential.
func (b *Backend) Location() string { return b.where }

// Bucket returns the bucket's name.
func (b *Backend) Bucket() string { return b.cfg.Bucket }

func (b *Backend) key(name string) (string, error) {
	if name == "" || strings.HasPrefix(name, "/") || strings.Contains(name, "..") || path.Clean(name) != name {
		return "", fmt.Errorf("invalid object name %q", name)
	}
	return b.prefix + name, nil
}

// Save implements backend.Backend.
func (b *Backend) Save(ctx context.Context, name string, data []byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	key, err := b.key(name)
	if err != nil {
		return err
	}
	if b.asOf != nil {
		return b.readOnly("save", name)
	}
	once := backend.WriteOnce(name) && !b.noConditional.Load()
	opts := minio.PutObjectOptions{ContentType: "application/octet-stream", UserMetadata: map[string]string{writtenMeta: time.Now().UTC().Format(time.RFC3339Nano)}}
	opts.Mode, opts.RetainUntilDate = b.retention(name)
	etag, err := b.put(ctx, key, data, once, opts)
	if once && isCode(err, "NotImplemented") {
		b.noConditional.Store(true)
		b.log.Debug("the S3 server does not implement conditional writes: write-once objects are saved plainly", "location", b.where)
		etag, err = b.put(ctx, key, data, false, opts)
	}
	if once && isCode(err, "PreconditionFailed") {
		// The name exists: the bytes of an earlier try of this Save (whose
		// answer was lost), or other bytes.
		return b.sameContent(ctx, name, key, data, etag)
	}
	return b.wrap("save", key, err)
}

// put uploads data in one PUT or in parts, and returns the ETag S3 gives
// such an upload (for sameContent).
func (b *Backend) put(ctx context.Context, key string, data []byte, once bool, opts minio.PutObjectOptions) (etag string, err error) {
	if int64(len(data)) > b.cfg.MultipartThreshold {
		return b.putMultipart(ctx, key, data, once, opts)
	}
	if once {
		opts.SetMatchETagExcept("*")
	}
	if b.crcVerified(ctx) {
		_, err = b.putCRC(ctx, key, data, crc32.Checksum(data, castagnoli), opts)
		if err == nil || !isCode(err, "InvalidArgument") && !isCode(err, "InvalidRequest") {
			return "", err
		}
		// The header refused after all: back to MD5 for good.
		b.crcMode.Store(crcNo)
	}
	sum := md5.Sum(data)
	_, err = b.putOne(ctx, key, data, sum, opts)
	return hex.EncodeToString(sum[:]), err
}

// Checksums of single PUTs. Content-MD5 is what every S3 server checks,
// but MD5 costs a tenth of a backup's CPU (docs/BENCHMARKS.md); CRC32C
// (x-amz-checksum-crc32c) is computed by the CPU's own instruction. A
// server that does not implement the header would ignore it, and the
// upload would go unchecked: so before the first PUT, crcVerified sends
// one with a wrong CRC32C, and only a server that refuses it as a bad
// digest gets CRC32C; the others get Content-MD5, as before.
const (
	crcUnknown int32 = iota
	crcYes
	crcNo
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// crcVerified reports whether the server checks x-amz-checksum-crc32c,
// probing it once (one refused PUT of a few bytes).
func (b *Backend) crcVerified(ctx context.Context) bool {
	if m := b.crcMode.Load(); m != crcUnknown {
		return m == crcYes
	}
	b.crcProbe.Lock()
	defer b.crcProbe.Unlock()
	if m := b.crcMode.Load(); m != crcUnknown {
		return m == crcYes
	}
	key := b.prefix + "probe/crc32c-" + crypt.RandomID().String()
	data := []byte("kura: does this server check x-amz-checksum-crc32c?\n")
	_, err := b.putCRC(ctx, key, data, crc32.Checksum(data, castagnoli)^1, minio.PutObjectOptions{})
	switch code := minio.ToErrorResponse(err).Code; {
	case err == nil:
		// Taken with a wrong checksum: the server ignores the header.
		_ = b.core.RemoveObject(ctx, b.cfg.Bucket, key, minio.RemoveObjectOptions{})
		b.crcMode.Store(crcNo)
	case code == "BadDigest" || code == "XAmzContentChecksumMismatch" || code == "InvalidDigest":
		b.crcMode.Store(crcYes)
	case ctx.Err() != nil || backend.IsTransient(b.wrap("probe", key, err)):
		return false // ask again next time
	default:
		b.crcMode.Store(crcNo)
	}
	b.log.Debug("S3 upload checksums", "crc32c", b.crcMode.Load() == crcYes, "probe", err)
	return b.crcMode.Load() == crcYes
}

// putCRC is one PUT of data with its CRC32C (sum) for the server to check.
func (b *Backend) putCRC(ctx context.Context, key string, data []byte, sum uint32, opts minio.PutObjectOptions) (minio.UploadInfo, error) {
	md := make(map[string]string, len(opts.UserMetadata)+1)
	for k, v := range opts.UserMetadata {
		md[k] = v
	}
	var c [4]byte
	binary.BigEndian.PutUint32(c[:], sum)
	md["X-Amz-Checksum-Crc32c"] = base64.StdEncoding.EncodeToString(c[:])
	opts.UserMetadata = md
	opts.ContentType = "application/octet-stream"
	opts.DisableContentSha256 = true
	return b.core.PutObject(ctx, b.cfg.Bucket, key, bytes.NewReader(data), int64(len(data)), "", b.sha256Hex(data), opts)
}

// putOne is one PUT of data, whose MD5 is sum, with opts.
func (b *Backend) putOne(ctx context.Context, key string, data []byte, sum [md5.Size]byte, opts minio.PutObjectOptions) (minio.UploadInfo, error) {
	opts.ContentType = "application/octet-stream"
	opts.DisableContentSha256 = true
	return b.core.PutObject(ctx, b.cfg.Bucket, key, bytes.NewReader(data), int64(len(data)),
		base64.StdEncoding.EncodeToString(sum[:]), b.sha256Hex(data), opts)
}

// sha256Hex is the payload hash to sign: none (UNSIGNED-PAYLOAD; the
// signed Content-MD5 protects the bytes), unless signPayload.
func (b *Backend) sha256Hex(data []byte) string {
	if !b.signPayload {
		return ""
	}
	s := sha256.Sum256(data)
	return hex.EncodeToString(s[:])
}

func (b *Backend) putMultipart(ctx context.Context, key string, data []byte, once bool, opts minio.PutObjectOptions) (string, error) {
	id, err := b.core.NewMultipartUpload(ctx, b.cfg.Bucket, key, opts)
	if err != nil {
		return "", err
	}
	n := int((int64(len(data)) + b.cfg.PartSize - 1) / b.cfg.PartSize)
	parts := make([]minio.CompletePart, n)
	sums := make([][md5.Size]byte, n)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(b.cfg.PartConcurrency)
	for i := range n {
		g.Go(func() error {
			p := data[int64(i)*b.cfg.PartSize : min(int64(i+1)*b.cfg.PartSize, int64(len(data)))]
			sums[i] = md5.Sum(p)
			op, err := b.core.PutObjectPart(gctx, b.cfg.Bucket, key, id, i+1, bytes.NewReader(p), int64(len(p)), minio.PutObjectPartOptions{
				Md5Base64: base64.StdEncoding.EncodeToString(sums[i][:]), Sha256Hex: b.sha256Hex(p), DisableContentSha256: true,
			})
			parts[i] = minio.CompletePart{PartNumber: i + 1, ETag: op.ETag}
			return err
		})
	}
	err = g.Wait()
	if err == nil {
		copts := minio.PutObjectOptions{}
		if once {
			copts.SetMatchETagExcept("*")
		}
		_, err = b.core.CompleteMultipartUpload(ctx, b.cfg.Bucket, key, id, parts, copts)
	}
	if err != nil {
		actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if aerr := b.core.AbortMultipartUpload(actx, b.cfg.Bucket, key, id); aerr != nil {
			b.log.Debug("aborting a failed multipart upload (prune removes it after a day)", "key", key, "err", aerr)
		}
		return "", err
	}
	all := md5.New()
	for _, s := range sums {
		all.Write(s[:])
	}
	return fmt.Sprintf("%x-%d", all.Sum(nil), n), nil
}

// sameContent decides a write-once Save whose name exists: it succeeds
// when the stored object holds data (the ETag S3 gives such an upload,
// or the bytes themselves), and fails with ErrExists otherwise.
func (b *Backend) sameContent(ctx context.Context, name, key string, data []byte, etag string) error {
	st, err := b.core.StatObject(ctx, b.cfg.Bucket, key, minio.StatObjectOptions{})
	if err != nil {
		return b.wrap("save", key, err)
	}
	if st.Size == int64(len(data)) {
		if etag != "" && strings.EqualFold(strings.Trim(st.ETag, `"`), etag) {
			return nil
		}
		stored, err := b.Load(ctx, name, 0, 0)
		if err != nil {
			return err
		}
		if bytes.Equal(stored, data) {
			return nil
		}
	}
	return fmt.Errorf("save %s: %w", b.show(key), backend.ErrExists)
}

// Load implements backend.Backend.
func (b *Backend) Load(ctx context.Context, name string, offset, length int64) ([]byte, error) {
	return b.load(ctx, name, offset, length, nil)
}

// LoadInto implements backend.LoaderInto.
func (b *Backend) LoadInto(ctx context.Context, name string, offset, length int64, buf []byte) ([]byte, error) {
	if int64(cap(buf)) < length {
		return nil, fmt.Errorf("load %s: buffer of %d bytes for %d", name, cap(buf), length)
	}
	if length == 0 {
		data, err := b.load(ctx, name, offset, 0, nil)
		if err != nil {
			return nil, err
		}
		return append(buf[:0], data...), nil
	}
	return b.load(ctx, name, offset, length, buf[:length])
}

// load reads length bytes at offset (0: to the end) into buf (nil: a new
// buffer).
func (b *Backend) load(ctx context.Context, name string, offset, length int64, buf []byte) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	key, err := b.key(name)
	if err != nil {
		return nil, err
	}
	if offset < 0 || length < 0 {
		return nil, fmt.Errorf("load %s: invalid range %d+%d", b.show(key), offset, length)
	}
	var opts minio.GetObjectOptions
	if b.asOf != nil {
		if opts.VersionID, err = b.versionAt(ctx, key); err != nil {
			return nil, err
		}
	}
	switch {
	case length > 0:
		err = opts.SetRange(offset, offset+length-1)
	case offset > 0:
		err = opts.SetRange(offset, 0)
	}
	if err != nil {
		return nil, err
	}
	body, _, h, err := b.core.GetObject(ctx, b.cfg.Bucket, key, opts)
	if isCode(err, "InvalidRange") {
		// The range starts at or past the end of the object.
		st, serr := b.Stat(ctx, name)
		switch {
		case serr != nil:
			return nil, serr
		case length == 0 && offset == st.Size:
			return []byte{}, nil
		}
		return nil, fmt.Errorf("load %s: range %d+%d of %d bytes: %w", b.show(key), offset, length, st.Size, backend.ErrTruncated)
	}
	if err != nil {
		return nil, b.wrap("load", key, err)
	}
	defer body.Close()
	start, total, err := contentRange(h)
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", b.show(key), err)
	}
	end := offset + length
	if length == 0 {
		end = total
	}
	if start > offset || end > total || offset > total {
		return nil, fmt.Errorf("load %s: range %d+%d of %d bytes: %w", b.show(key), offset, length, total, backend.ErrTruncated)
	}
	if start < offset { // the server ignored the range
		if _, err := io.CopyN(io.Discard, body, offset-start); err != nil {
			return nil, b.wrap("load", key, err)
		}
	}
	if buf == nil {
		buf = make([]byte, end-offset)
	}
	if _, err := io.ReadFull(body, buf); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, b.wrap("load", key, err)
	}
	return buf, nil
}

// contentRange returns where a GET's body starts and the object's size:
// from Content-Range ("bytes 100-199/5000") for a ranged answer, else
// 0 and Content-Length.
func contentRange(h http.Header) (start, total int64, err error) {
	cr := h.Get("Content-Range")
	if cr == "" {
		n, err := parseInt(h.Get("Content-Length"))
		if err != nil {
			return 0, 0, fmt.Errorf("the server's answer has no usable Content-Length (%q)", h.Get("Content-Length"))
		}
		return 0, n, nil
	}
	var end int64
	if _, err := fmt.Sscanf(cr, "bytes %d-%d/%d", &start, &end, &total); err != nil {
		return 0, 0, fmt.Errorf("the server's answer has a Content-Range %q that does not parse", cr)
	}
	return start, total, nil
}

func parseInt(s string) (int64, error) {
	var n int64
	if _, err := fmt.Sscanf(s, "%d", &n); err != nil || n < 0 {
		return 0, errors.New("not a size")
	}
	return n, nil
}

// Stat implements backend.Backend.
func (b *Backend) Stat(ctx context.Context, name string) (backend.ObjectInfo, error) {
	key, err := b.key(name)
	if err != nil {
		return backend.ObjectInfo{}, err
	}
	var opts minio.StatObjectOptions
	if b.asOf != nil {
		if opts.VersionID, err = b.versionAt(ctx, key); err != nil {
			return backend.ObjectInfo{}, err
		}
	}
	st, err := b.core.StatObject(ctx, b.cfg.Bucket, key, opts)
	if err != nil {
		return backend.ObjectInfo{}, b.wrap("stat", key, err)
	}
	return backend.ObjectInfo{Name: name, Size: st.Size, ModTime: st.LastModified}, nil
}

// List implements backend.Backend.
func (b *Backend) List(ctx context.Context, prefix string, fn func(backend.ObjectInfo) error) error {
	if b.asOf != nil {
		return b.listAsOf(ctx, prefix, fn)
	}
	lctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ch := b.core.Client.ListObjects(lctx, b.cfg.Bucket, minio.ListObjectsOptions{Prefix: b.prefix + prefix, Recursive: true})
	var err error
	for oi := range ch {
		if err != nil {
			continue // drain after cancel
		}
		if oi.Err != nil {
			err = b.wrap("list", b.prefix+prefix, oi.Err)
			cancel()
			continue
		}
		name, ok := strings.CutPrefix(oi.Key, b.prefix)
		if !ok || name == "" || strings.HasSuffix(name, "/") {
			continue // a directory marker some servers list
		}
		if ferr := fn(backend.ObjectInfo{Name: name, Size: oi.Size, ModTime: oi.LastModified}); ferr != nil {
			err = ferr
			cancel()
		}
	}
	if err == nil {
		err = ctx.Err()
	}
	return err
}

// Remove implements backend.Backend.
func (b *Backend) Remove(ctx context.Context, name string) error {
	key, err := b.key(name)
	if err != nil {
		return err
	}
	if b.asOf != nil {
		return b.readOnly("remove", name)
	}
	// S3's DELETE succeeds whether or not the key exists; the contract
	// wants ErrNotFound for a missing object.
	if _, err := b.core.StatObject(ctx, b.cfg.Bucket, key, minio.StatObjectOptions{}); err != nil {
		return b.wrap("remove", key, err)
	}
	if err := b.core.RemoveObject(ctx, b.cfg.Bucket, key, minio.RemoveObjectOptions{}); err != nil {
		return b.wrap("remove", key, err)
	}
	return nil
}

// RemoveStaleTemp implements backend.TempCleaner: it aborts the
// incomplete multipart uploads under the prefix started more than
// backend.StaleTempAge ago (a process killed while uploading a large
// object), which the server would otherwise keep, and bill, for ever. The
// bytes they held are not reported (S3 does not list them cheaply). A
// server that does not list multipart uploads has none to remove.
func (b *Backend) RemoveStaleTemp(ctx context.Context) (n int, bytes int64, err error) {
	if b.asOf != nil {
		return 0, 0, nil
	}
	keyMarker, idMarker := "", ""
	now := time.Now()
	for {
		res, err := b.core.ListMultipartUploads(ctx, b.cfg.Bucket, b.prefix, keyMarker, idMarker, "", 1000)
		if isCode(err, "NotImplemented") {
			return n, 0, nil
		}
		if err != nil {
			return n, 0, b.wrap("list multipart uploads", b.prefix, err)
		}
		for _, u := range res.Uploads {
			if u.Initiated.IsZero() || now.Sub(u.Initiated) < b.staleAge {
				continue
			}
			if err := b.core.AbortMultipartUpload(ctx, b.cfg.Bucket, u.Key, u.UploadID); err != nil && !isCode(err, "NoSuchUpload") {
				return n, 0, b.wrap("abort multipart upload", u.Key, err)
			}
			n++
		}
		if !res.IsTruncated || (res.NextKeyMarker == keyMarker && res.NextUploadIDMarker == idMarker) {
			return n, 0, nil
		}
		keyMarker, idMarker = res.NextKeyMarker, res.NextUploadIDMarker
	}
}

var (
	_ backend.Backend     = (*Backend)(nil)
	_ backend.LoaderInto  = (*Backend)(nil)
	_ backend.TempCleaner = (*Backend)(nil)
)
