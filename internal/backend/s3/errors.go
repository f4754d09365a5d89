package s3

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"syscall"

	"github.com/minio/minio-go/v7"

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

// wrap turns a minio-go error into a one-line error naming the bucket and
// key, mapped to the backend's sentinels and marked transient when a
// repeated call may succeed.
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
	case er.Code == "NoSuchBucket":
		return fmt.Errorf("%s %s: bucket %q: %w", op, b.where, b.cfg.Bucket, ErrNoBucket)
	case accessCodes[er.Code]:
		return fmt.Errorf("%s %s: %s: %w", op, where, er.Code, ErrAccess)
	case fullCodes[er.Code] || er.StatusCode == http.StatusInsufficientStorage:
		return fmt.Errorf("%s %s: %s: %w", op, where, er.Code, backend.ErrNoSpace)
	case er.Code == "RequestTimeTooSkewed":
		return fmt.Errorf("%s %s: the clock of this host and the S3 server's differ by more than S3 allows: set the time (NTP)", op, where)
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
		return fmt.Errorf("%s %s: TLS: %w (for a private certificate authority add ?ca=FILE to the location or set AWS_CA_BUNDLE)", op, where, err)
	}
	var ne net.Error
	if sent || errors.As(err, &ne) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) {
		return backend.Transient(fmt.Errorf("%s %s: %w", op, where, err))
	}
	return fmt.Errorf("%s %s: %w", op, where, err)
}
