package cluster_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"

	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/trtest"
)

// certs writes a CA and a certificate signed by it for the server
// (127.0.0.1) and for a client, as PEM files in dir.
func certs(t *testing.T, dir string) (ca, srvCert, srvKey, cliCert, cliKey string) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "tokenrelay test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	write := func(name, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	ca = write("ca.pem", "CERTIFICATE", caDER)
	leaf := func(name string, serial int64, usage x509.ExtKeyUsage) (string, string) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
			IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kder, _ := x509.MarshalECPrivateKey(key)
		return write(name+".pem", "CERTIFICATE", der), write(name+"-key.pem", "EC PRIVATE KEY", kder)
	}
	srvCert, srvKey = leaf("server", 2, x509.ExtKeyUsageServerAuth)
	cliCert, cliKey = leaf("client", 3, x509.ExtKeyUsageClientAuth)
	return
}

// operator sets opts up for decentralised JWT auth (one operator, a system
// account and an application account with JetStream) and returns a
// credentials file of a user of the application account.
func operator(t *testing.T, opts *server.Options, dir string) string {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	okp, err := nkeys.CreateOperator()
	must(err)
	opub, _ := okp.PublicKey()
	oc := jwt.NewOperatorClaims(opub)
	ojwt, err := oc.Encode(okp)
	must(err)
	oc, err = jwt.DecodeOperatorClaims(ojwt)
	must(err)
	resolver := &server.MemAccResolver{}
	account := func(js bool) (nkeys.KeyPair, string) {
		kp, err := nkeys.CreateAccount()
		must(err)
		pub, _ := kp.PublicKey()
		ac := jwt.NewAccountClaims(pub)
		if js {
			ac.Limits.JetStreamLimits = jwt.JetStreamLimits{MemoryStorage: -1, DiskStorage: -1, Streams: -1, Consumer: -1}
		}
		s, err := ac.Encode(okp)
		must(err)
		must(resolver.Store(pub, s))
		return kp, pub
	}
	_, sys := account(false)
	akp, _ := account(true)
	ukp, err := nkeys.CreateUser()
	must(err)
	upub, _ := ukp.PublicKey()
	ujwt, err := jwt.NewUserClaims(upub).Encode(akp)
	must(err)
	seed, _ := ukp.Seed()
	creds, err := jwt.FormatUserConfig(ujwt, seed)
	must(err)
	opts.TrustedOperators = []*jwt.OperatorClaims{oc}
	opts.AccountResolver = resolver
	opts.SystemAccount = sys
	p := filepath.Join(dir, "user.creds")
	must(os.WriteFile(p, creds, 0o600))
	return p
}

// TestNATSCredsAndTLS runs a gateway and a worker against a NATS server that
// demands TLS with a client certificate and a user JWT: --nats-creds and
// --nats-tls-ca/-cert/-key get them in, and a turn streams. Without the
// credentials the worker refuses to start with a clear reason.
func TestNATSCredsAndTLS(t *testing.T) {
	pg := postgresURL(t)
	dir := t.TempDir()
	ca, srvCert, srvKey, cliCert, cliKey := certs(t, dir)
	opts := &server.Options{
		ServerName: "tls", JetStream: true, StoreDir: t.TempDir(),
		Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true,
	}
	tc, err := server.GenTLSConfig(&server.TLSConfigOpts{CertFile: srvCert, KeyFile: srvKey, CaFile: ca, Verify: true})
	if err != nil {
		t.Fatal(err)
	}
	opts.TLSConfig, opts.TLS, opts.TLSVerify, opts.TLSTimeout = tc, true, true, 5
	creds := operator(t, opts, dir)
	ns, err := bus.StartEmbedded(bus.EmbeddedConfig{Options: opts})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Shutdown)

	tlsArgs := []string{"--nats-tls-ca", ca, "--nats-tls-cert", cliCert, "--nats-tls-key", cliKey}
	common := append([]string{"--nats-url", ns.Server.ClientURL(), "--store-url", pg}, tlsArgs...)
	// Refused without credentials, and without a client certificate.
	for name, args := range map[string][]string{
		"no creds":       common,
		"no client cert": {"--nats-url", ns.Server.ClientURL(), "--store-url", pg, "--nats-tls-ca", ca, "--nats-creds", creds},
	} {
		out, err := exec.Command(trtest.Binary(t), append([]string{"worker"}, args...)...).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "connect nats") {
			t.Fatalf("%s: worker exited with %v:\n%s", name, err, out)
		}
	}
	common = append(common, "--nats-creds", creds)
	trtest.Start(t, append([]string{"worker"}, common...)...)
	gw := trtest.Start(t, append([]string{"gateway", "--addr", "127.0.0.1:0"}, common...)...)
	gw.WaitReady(t)
	cl := trtest.Dial(t, gw.WSURL(), nil)
	cl.Join("tls", nil)
	send(cl, "tls", "t", "hello [sim tokens=30 rate=0]")
	tr := &trtest.Turn{ID: "t"}
	finish(t, cl, tr)
	if tr.Status != "complete" || tr.Seq != 30 {
		t.Fatalf("turn over TLS and JWT auth ended %s at seq %d", tr.Status, tr.Seq)
	}
}
