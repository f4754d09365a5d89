package s3

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/minio/minio-go/v7/pkg/credentials"
)

// FromEnv returns the credentials the environment names, read through
// getenv (os.Getenv in kura), the way AWS tools read them:
// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for
// temporary ones), else the profile (profile, else AWS_PROFILE, else
// "default") of the shared credentials file (AWS_SHARED_CREDENTIALS_FILE,
// else ~/.aws/credentials). It also says where they came from, for a
// debug line; never a secret.
func FromEnv(getenv func(string) string, profile string) (*credentials.Credentials, string, error) {
	id, secret := getenv("AWS_ACCESS_KEY_ID"), getenv("AWS_SECRET_ACCESS_KEY")
	switch {
	case id != "" && secret != "" && profile == "":
		return credentials.NewStaticV4(id, secret, getenv("AWS_SESSION_TOKEN")), "environment (AWS_ACCESS_KEY_ID)", nil
	case id != "" && profile == "":
		return nil, "", errors.New("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not: set both (or neither, and use a credentials file)")
	}
	if profile == "" {
		profile = getenv("AWS_PROFILE")
	}
	if profile == "" {
		profile = "default"
	}
	file := getenv("AWS_SHARED_CREDENTIALS_FILE")
	if file == "" {
		home := getenv("HOME")
		if home == "" {
			home, _ = os.UserHomeDir()
		}
		file = filepath.Join(home, ".aws", "credentials")
	}
	if _, err := os.Stat(file); err != nil {
		return nil, "", fmt.Errorf("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or write them into a credentials file (%s; AWS_SHARED_CREDENTIALS_FILE names another)", file)
	}
	c := credentials.NewFileAWSCredentials(file, profile)
	v, err := c.Get()
	if err != nil || v.AccessKeyID == "" || v.SecretAccessKey == "" {
		return nil, "", fmt.Errorf("no S3 credentials for profile %q in %s: add aws_access_key_id and aws_secret_access_key to it, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", profile, file)
	}
	return c, fmt.Sprintf("profile %q of %s", profile, file), nil
}
