package s3

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"syscall"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/s3utils"

	"github.com/kura-backup/kura/internal/backend"
)

// show names a key for messages: s3://bucket/key.
func (b *Backend) show(key string) string {
	return "s3://" + b.cfg.Bucket + "/" + key
}

// isCode reports whether err is the S3 error code.
func isCode(err error, code string) bool {
	return err != nil && minio.ToErrorResponse(err).Code == code
}

// Codes that say the credentials or permissions are refused.
var accessCodes = map[string]bool{
	"AccessDenied": true, "InvalidAccessKeyId": true, "SignatureDoesNotMatch": true,
	"ExpiredToken": true, "InvalidToken": true, "TokenRefreshRequired": true,
	"AuthorizationHeaderMalformed": true, "InvalidSecurity": true, "AllAccessDisabled": true,
	"AccountProblem": true, "NotSignedUp": true,
	"XAdminUserNotFound": true, // versitygw: an unknown access key (a 404)
}

// Codes that say the storage is full.
var fullCodes = map[string]bool{
	"QuotaExceeded": true, "XMinioStorageFull": true, "StorageFull": true,
	"InsufficientStorage": true, "XMinioAdminBucketQuotaExceeded": true,
}

// Codes worth repeating the request for: the server was busy or failed,
// or the bytes arrived damaged.
var transientCodes = map[string]bool{
	"SlowDown": true, "InternalError": true, "ServiceUnavailable": true,
	"RequestTimeout": true, "RequestTimeoutException": true, "Throttling": true,
	"ThrottlingException": true, "OperationAborted": true, "BadDigest": true,
	"XAmzContentSHA256Mismatch": true, "IncompleteBody": true,
	"XMinioServerNotInitialized": true, "XMinioReadQuorum": true, "XMinioWriteQuorum": true,
}

// accessHints say, for an access error code, what was refused and what
// to check; every such message says "check the credentials".
var accessHints = map[string]string{
	"InvalidAccessKeyId":           "the S3 server does not know the access key: check the credentials: AWS_ACCESS_KEY_ID, or aws_access_key_id of the profile",
	"XAdminUserNotFound":           "the S3 server does not know the access key: check the credentials: AWS_ACCESS_KEY_ID, or aws_access_key_id of the profile",
	"NotSignedUp":                  "the S3 server does not know the access key: check the credentials: AWS_ACCESS_KEY_ID, or aws_access_key_id of the profile",
	"SignatureDoesNotMatch":        "the S3 server refused the request's signature: check the credentials: AWS_SECRET_ACCESS_KEY, or aws_secret_access_key of the profile, must be the access key's secret",
	"ExpiredToken":                 "the S3 server refused the session token: check the credentials: get new temporary ones, or unset AWS_SESSION_TOKEN for a long-term key",
	"InvalidToken":                 "the S3 server refused the session token: check the credentials: get new temporary ones, or unset AWS_SESSION_TOKEN for a long-term key",
	"TokenRefreshRequired":         "the S3 server refused the session token: check the credentials: get new temporary ones, or unset AWS_SESSION_TOKEN for a long-term key",
	"AuthorizationHeaderMalformed": "the S3 server refused the request's authorization (often a wrong region): check the credentials and the region (?region=NAME or AWS_REGION)",
}

// hinted is an error with a message of its own that says what to do,
// which errors.Is still finds to be one of the package's sentinels.
type hinted struct {
	msg string
	is  error
}

func (h *hinted) Error() string { return h.msg }
func (h *hinted) Unwrap() error { return h.is }

// bucketRule is what S3 allows as a bucket name.
const bucketRule = "3 to 63 lowercase letters, digits, dots and hyphens, starting and ending with a letter or digit"

// wrap turns a minio-go error into a one-line error naming the bucket and
// key, mapped to the backend's sentinels and marked transient when a
// repeated call may succeed; errors a user can fix (credentials, the
// bucket, the endpoint, TLS, the clock) say what to do.
func (b *Backend) wrap(op, key string, err error) error {
	if err == nil {
		return nil
	}
	where := b.where
	if key != "" {
		where = b.show(key)
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%s %s: %w", op, where, err)
	}
	er := minio.ToErrorResponse(err)
	switch {
	case er.Code == "NoSuchKey":
		return fmt.Errorf("%s %s: %w", op, where, backend.ErrNotFound)
	case er.Code == "NoSuchBucket" && op == "open" && notS3(er):
		return fmt.Errorf("%s %s: %w", op, b.where, &hinted{fmt.Sprintf("bucket %q does not exist, or %s is not an S3 server (it answered %d without an S3 request id): correct the repository location, or create the bucket", b.cfg.Bucket, b.host(), er.StatusCode), ErrNoBucket})
	case accessCodes[er.Code] && op == "open" && notS3(er):
		return fmt.Errorf("%s %s: %w", op, b.where, &hinted{fmt.Sprintf("access refused, or %s is not an S3 server (it answered %d without an S3 request id): correct the repository location, or check the credentials", b.host(), er.StatusCode), ErrAccess})
	case er.Code == "NoSuchBucket":
		if s3utils.CheckValidBucketNameStrict(b.cfg.Bucket) != nil {
			return fmt.Errorf("%s %s: %w", op, b.where, &hinted{fmt.Sprintf("bucket %q does not exist, and it is not a valid S3 bucket name (%s): correct the repository location", b.cfg.Bucket, bucketRule), ErrNoBucket})
		}
		return fmt.Errorf("%s %s: bucket %q: %w", op, b.where, b.cfg.Bucket, ErrNoBucket)
	case er.Code == "InvalidBucketName":
		return fmt.Errorf("%s %s: %q is not a valid S3 bucket name (%s): correct the repository location", op, b.where, b.cfg.Bucket, bucketRule)
	case accessCodes[er.Code]:
		hint := accessHints[er.Code]
		if hint == "" {
			return fmt.Errorf("%s %s: %s: %w", op, where, er.Code, ErrAccess)
		}
		return fmt.Errorf("%s %s: %w", op, where, &hinted{fmt.Sprintf("%s (%s)", hint, er.Code), ErrAccess})
	case fullCodes[er.Code] || er.StatusCode == http.StatusInsufficientStorage:
		return fmt.Errorf("%s %s: %s: %w", op, where, er.Code, backend.ErrNoSpace)
	case er.Code == "RequestTimeTooSkewed":
		return fmt.Errorf("%s %s: the clock of this host and the S3 server's differ by more than S3 allows (15 minutes): set the time (NTP)", op, where)
	case er.StatusCode == http.StatusBadRequest && op == "open" && b.plainToTLS():
		return b.tlsNeeded(op)
	case transientCodes[er.Code] || er.StatusCode >= 500 || er.StatusCode == http.StatusTooManyRequests || er.StatusCode == http.StatusRequestTimeout:
		return backend.Transient(fmt.Errorf("%s %s: %s: %s", op, where, er.Code, er.Error()))
	case er.Code != "":
		return fmt.Errorf("%s %s: %s: %s", op, where, er.Code, er.Error())
	}
	// Not an answer from the server: the request or the answer's body did
	// not get through.
	var ue *url.Error
	sent := errors.As(err, &ue)
	if sent {
		err = ue.Err // the URL holds nothing secret, but is long
	}
	var uae x509.UnknownAuthorityError
	var hne x509.HostnameError
	var cie x509.CertificateInvalidError
	if errors.As(err, &uae) || errors.As(err, &hne) || errors.As(err, &cie) {
		return fmt.Errorf("%s %s: the server's TLS certificate is not trusted (%v): for a private certificate authority add ?ca=FILE to the location or set AWS_CA_BUNDLE", op, where, certReason(err))
	}
	if strings.Contains(err.Error(), "server gave HTTP response to HTTPS client") {
		// Go's words for a TLS handshake answered in plain HTTP.
		return fmt.Errorf("%s %s: the server answers plain HTTP, not TLS: use s3:http://%s/… on a network you trust, or turn on TLS on the server", op, b.where, b.host())
	}
	if why, ok := unreachable(err); ok {
		// The whole server, not the object: name the endpoint.
		return backend.Transient(fmt.Errorf("%s %s: the S3 server could not be reached (%s): check that it is running and that the location's host and port are right", op, b.where, why))
	}
	closed := strings.Contains(err.Error(), "Connection closed by foreign host") // minio-go's words for an EOF, with the URL
	if closed && op == "open" && b.plainToTLS() {
		return b.tlsNeeded(op)
	}
	if closed {
		err = errors.New("the S3 server closed the connection")
	}
	var ne net.Error
	if sent || errors.As(err, &ne) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) {
		return backend.Transient(fmt.Errorf("%s %s: %w", op, where, err))
	}
	return fmt.Errorf("%s %s: %w", op, where, err)
}

// notS3 reports whether an answer minio-go read as an S3 error came
// without what every S3 server sends (a request id): a 404 or 403 of
// some other HTTP server (a wrong port, a proxy), which minio-go reads as
// NoSuchBucket or AccessDenied.
func notS3(er minio.ErrorResponse) bool {
	return er.RequestID == "" && er.HostID == ""
}

// host is the endpoint's host:port.
func (b *Backend) host() string {
	u, err := url.Parse(b.cfg.Endpoint)
	if err != nil {
		return b.cfg.Endpoint
	}
	return u.Host
}

// plainToTLS reports whether the endpoint is plain HTTP and a TLS
// handshake with it succeeds: a server that speaks TLS only, which
// closes a plain request's connection or answers it 400. Only for a
// failed open: it costs a connection.
func (b *Backend) plainToTLS() bool {
	if !strings.HasPrefix(b.cfg.Endpoint, "http://") {
		return false
	}
	d := &net.Dialer{Timeout: 3 * time.Second}
	c, err := tls.DialWithDialer(d, "tcp", b.host(), &tls.Config{InsecureSkipVerify: true}) // only to see whether it speaks TLS
	if err != nil {
		return false
	}
	c.Close()
	return true
}

func (b *Backend) tlsNeeded(op string) error {
	return fmt.Errorf("%s %s: the server speaks TLS (HTTPS), not plain HTTP: use s3:https://%s/… (with ?ca=FILE for a private certificate authority)", op, b.where, b.host())
}

// unreachable reports whether err says the server could not be
// connected to, and why in a few words.
func unreachable(err error) (string, bool) {
	var dns *net.DNSError
	if errors.As(err, &dns) {
		if dns.IsNotFound {
			return "its host name does not resolve", true
		}
		return "looking up its host name failed: " + dns.Err, true
	}
	var oe *net.OpError
	if !errors.As(err, &oe) || oe.Op != "dial" {
		return "", false
	}
	var errno syscall.Errno
	switch {
	case oe.Timeout():
		return "connecting timed out", true
	case errors.As(err, &errno):
		return errno.Error(), true
	}
	return oe.Err.Error(), true
}

// certReason is the x509 error without Go's "tls: failed to verify
// certificate: " in front.
func certReason(err error) string {
	s := err.Error()
	if i := strings.Index(s, "x509: "); i >= 0 {
		return s[i:]
	}
	return s
}
