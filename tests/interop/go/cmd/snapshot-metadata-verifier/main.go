// snapshot-metadata-verifier: copies the ranges the sidecar reports from a
// source device (the snapshot restored) onto a target device (the earlier
// snapshot restored, or an empty device for allocated blocks), then
// compares the two whole devices: under-reporting fails, over-reporting
// passes. Flags as upstream's tools/snapshot-metadata-verifier; the copy
// and comparison are the upstream iterator.VerifierEmitter.
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
	var src, tgt string
	flag.StringVar(&src, "source-device-path", "", "the snapshot restored")
	flag.StringVar(&src, "src", "", "shorthand for -source-device-path")
	flag.StringVar(&tgt, "target-device-path", "", "the earlier snapshot restored (or an empty device)")
	flag.StringVar(&tgt, "tgt", "", "shorthand for -target-device-path")
	flag.Parse()
	if src == "" || tgt == "" {
		fmt.Fprintln(os.Stderr, "-src and -tgt are required")
		os.Exit(1)
	}
	source, err := os.Open(src)
	if err != nil {
		fmt.Fprintf(os.Stderr, "failed to open source device %s: %v\n", src, err)
		os.Exit(1)
	}
	defer source.Close()
	target, err := os.OpenFile(tgt, os.O_RDWR, 0)
	if err != nil {
		fmt.Fprintf(os.Stderr, "failed to open target device %s: %v\n", tgt, err)
		os.Exit(1)
	}
	defer target.Close()
	f.Run(&iterator.VerifierEmitter{SourceDevice: source, TargetDevice: target})
	fmt.Println("verified: the target device equals the source device")
}
