// The external-snapshot-metadata sidecar, exactly as its own
// cmd/csi-snapshot-metadata main runs it.
package main

import (
	"os"

	"github.com/kubernetes-csi/external-snapshot-metadata/pkg/sidecar"
)

const version = "v1.1.0"

func main() {
	os.Exit(sidecar.Run(os.Args, version))
}
