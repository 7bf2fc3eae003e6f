// Package iterflags holds the command-line flags that the upstream
// snapshot-metadata-lister and snapshot-metadata-verifier tools share
// (same names, shorthands and defaults), and runs the upstream iterator
// (github.com/kubernetes-csi/external-snapshot-metadata/pkg/iterator) with
// an emitter. Everything past flag parsing is upstream code: resolving the
// VolumeSnapshot, its content and driver, the SnapshotMetadataService CR,
// creating the audience-scoped token, the TLS gRPC stream to the sidecar
// and the emitters.
package iterflags

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"

	"github.com/kubernetes-csi/external-snapshot-metadata/pkg/iterator"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// Flags are the parsed arguments.
type Flags struct {
	Args       iterator.Args
	Kubeconfig string
	maxResults int
}

// Register defines the shared flags on the default flag set.
func Register() *Flags {
	f := &Flags{}
	twice := func(p *string, long, short, usage string) {
		flag.StringVar(p, long, "", usage)
		flag.StringVar(p, short, "", "shorthand for -"+long)
	}
	twice(&f.Args.Namespace, "namespace", "n", "namespace of the VolumeSnapshots")
	twice(&f.Args.SnapshotName, "snapshot", "s", "the VolumeSnapshot")
	twice(&f.Args.PrevSnapshotName, "previous-snapshot", "p", "an earlier VolumeSnapshot: changed blocks since it")
	twice(&f.Args.PrevSnapshotID, "previous-snapshot-id", "P", "the CSI handle of an earlier snapshot (wins over -p)")
	flag.StringVar(&f.Kubeconfig, "kubeconfig", "", "kubeconfig file (in-cluster config if empty)")
	flag.StringVar(&f.Args.SAName, "service-account", "", "ServiceAccount the token is made for (default: the caller's own)")
	flag.StringVar(&f.Args.SANamespace, "service-account-namespace", "", "its namespace")
	flag.Int64Var(&f.Args.TokenExpirySecs, "token-expiry", 600, "token lifetime in seconds")
	flag.Int64Var(&f.Args.StartingOffset, "starting-offset", 0, "starting byte offset")
	flag.IntVar(&f.maxResults, "max-results", 0, "tuples per message (0: the driver's choice)")
	return f
}

// Run parses the flags, builds the clients and runs the iterator with the
// emitter; exits 1 with the error on failure, 0 on success.
func (f *Flags) Run(emitter iterator.IteratorEmitter) {
	f.Args.MaxResults = int32(f.maxResults)
	var config *rest.Config
	var err error
	if f.Kubeconfig != "" {
		config, err = clientcmd.BuildConfigFromFlags("", f.Kubeconfig)
	} else {
		config, err = rest.InClusterConfig()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "Error loading kubeconfig %q: %v\n", f.Kubeconfig, err)
		os.Exit(1)
	}
	clients, err := iterator.BuildClients(config)
	if err != nil {
		fmt.Fprintf(os.Stderr, "Error creating clients: %v\n", err)
		os.Exit(1)
	}
	f.Args.Clients = clients
	f.Args.Emitter = emitter
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := iterator.GetSnapshotMetadata(ctx, f.Args); err != nil {
		fmt.Fprintf(os.Stderr, "Error: %v\n", err)
		os.Exit(1)
	}
}
