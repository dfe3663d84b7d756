//go:build !unix

package l402

// lockFile: no cross-process lock on this system; one process per store file.
func lockFile(string) (func() error, error) {
	return func() error { return nil }, nil
}
