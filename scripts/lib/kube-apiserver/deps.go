// Package build pins the kube-apiserver that Membrane's tests run against: go.mod and go.sum
// select k8s.io/kubernetes and its staging modules, and this import keeps every package the
// kube-apiserver command needs in the module graph. scripts/lib/kube.sh builds
// k8s.io/kubernetes/cmd/kube-apiserver from here; nothing in this directory is Membrane code.
package build

import _ "k8s.io/kubernetes/cmd/kube-apiserver/app"
