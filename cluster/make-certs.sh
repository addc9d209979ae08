#!/usr/bin/env bash
# Make a dedicated certificate authority and one node certificate for a Dask cluster with TLS.
#
#   cluster/make-certs.sh DIR
#
# writes DIR/ca.pem (the CA certificate), DIR/node.pem and DIR/node-key.pem (certificate and key
# used by the scheduler, the workers and the client), in a directory only you can read. The CA's
# private key is deleted once the node certificate is signed, so no further certificates can be
# issued from it: whoever holds node-key.pem can join the cluster and run code on it, so keep DIR
# private (on a shared file system: mode 700, as made here) and make new ones per cluster or job.
# Dask does not check host names (it expects a dedicated CA), so one certificate serves every node.
# Validity: NNGP_DASK_CERT_DAYS days (default 7).
set -euo pipefail
dir=${1:?usage: cluster/make-certs.sh DIR}
days=${NNGP_DASK_CERT_DAYS:-7}
umask 077
mkdir -p "$dir"
chmod 700 "$dir"
openssl req -x509 -newkey rsa:3072 -nodes -sha256 -days "$days" -subj "/CN=nngp-dask cluster CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$dir/ca-key.pem" -out "$dir/ca.pem" 2>/dev/null
openssl req -newkey rsa:3072 -nodes -sha256 -subj "/CN=nngp-dask node" \
    -keyout "$dir/node-key.pem" -out "$dir/node.csr" 2>/dev/null
ext="$dir/node.ext"
printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n' > "$ext"
openssl x509 -req -sha256 -days "$days" -in "$dir/node.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" \
    -CAcreateserial -extfile "$ext" -out "$dir/node.pem" 2>/dev/null
rm -f "$dir/ca-key.pem" "$dir/node.csr" "$dir/ca.srl" "$ext"
echo "TLS material for a Dask cluster in $dir: ca.pem node.pem node-key.pem (valid $days days)"
