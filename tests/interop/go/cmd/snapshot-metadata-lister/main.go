// snapshot-metadata-lister: lists the allocated blocks of a VolumeSnapshot,
// or the blocks changed since an earlier one, through the sidecar.
// Flags as upstream's tools/snapshot-metadata-lister; output from the
// upstream emitters (-o table or json).
package main

import (
	"flag"
	"fmt"
	"os"

	"cbt.test/interop-peers/internal/iterflags"
	"github.com/kubernetes-csi/external-snapshot-metadata/pkg/iterator"
)

func main() {
	f := iterflags.Register()
	var output string
	flag.StringVar(&output, "o", "table", "output format: table or json")
	flag.Parse()
	var emitter iterator.IteratorEmitter
	switch output {
	case "table":
		emitter = &iterator.TableEmitter{Writer: os.Stdout}
	case "json":
		emitter = &iterator.JSONEmitter{Writer: os.Stdout}
	default:
		fmt.Fprintf(os.Stderr, "unknown output format %q\n", output)
		os.Exit(1)
	}
	f.Run(emitter)
}
