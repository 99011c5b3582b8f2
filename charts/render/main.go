// render: renders a Helm chart's templates the way `helm template` does, for CI machines
// where Helm itself cannot be installed (it is not packaged by Debian and only the package
// registries are reachable). Helm's template language is Go's text/template with the sprig
// functions plus a few of Helm's own; this implements the ones the chart uses (toYaml,
// required, include, tpl is not used) and nothing else, so a template that uses another
// Helm function fails here with "function ... not defined".
//
//	go run ./charts/render CHART_DIR NAMESPACE [VALUES_OVERRIDE.yaml]
//
// Built with Debian's golang-go, golang-github-masterminds-sprig-dev and
// golang-gopkg-yaml.v3-dev (GOPATH=/usr/share/gocode GO111MODULE=off; Debian's sprig 3 is
// at the GOPATH import path without /v3).
package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	"gopkg.in/yaml.v3"
)

func readValues(path string) map[string]interface{} {
	raw, err := os.ReadFile(path)
	if err != nil {
		fail("%v", err)
	}
	values := map[string]interface{}{}
	if err := yaml.Unmarshal(raw, &values); err != nil {
		fail("%s: %v", path, err)
	}
	return values
}

// merge copies over into base, recursing into maps, as Helm merges -f files.
func merge(base, over map[string]interface{}) {
	for k, v := range over {
		if vm, ok := v.(map[string]interface{}); ok {
			if bm, ok := base[k].(map[string]interface{}); ok {
				merge(bm, vm)
				continue
			}
		}
		base[k] = v
	}
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "render: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 3 {
		fail("usage: render CHART_DIR NAMESPACE [VALUES_OVERRIDE.yaml]")
	}
	chart, namespace := os.Args[1], os.Args[2]
	values := readValues(filepath.Join(chart, "values.yaml"))
	if len(os.Args) > 3 {
		merge(values, readValues(os.Args[3]))
	}
	meta := readValues(filepath.Join(chart, "Chart.yaml"))

	root := template.New("chart")
	funcs := sprig.TxtFuncMap()
	funcs["toYaml"] = func(v interface{}) string {
		var out bytes.Buffer
		enc := yaml.NewEncoder(&out)
		enc.SetIndent(2)
		if err := enc.Encode(v); err != nil {
			return ""
		}
		return strings.TrimSuffix(out.String(), "\n")
	}
	funcs["required"] = func(msg string, v interface{}) (interface{}, error) {
		if v == nil || v == "" {
			return nil, fmt.Errorf("%s", msg)
		}
		return v, nil
	}
	funcs["include"] = func(name string, data interface{}) (string, error) {
		var buf bytes.Buffer
		err := root.ExecuteTemplate(&buf, name, data)
		return buf.String(), err
	}
	root.Funcs(funcs).Option("missingkey=zero")

	files, _ := filepath.Glob(filepath.Join(chart, "templates", "*"))
	sort.Strings(files)
	var names []string
	for _, f := range files {
		if !strings.HasSuffix(f, ".yaml") && !strings.HasSuffix(f, ".tpl") {
			continue
		}
		text, err := os.ReadFile(f)
		if err != nil {
			fail("%v", err)
		}
		name := filepath.Join("templates", filepath.Base(f))
		if _, err := root.New(name).Parse(string(text)); err != nil {
			fail("%v", err)
		}
		if strings.HasSuffix(f, ".yaml") {
			names = append(names, name)
		}
	}
	data := map[string]interface{}{
		"Values":  values,
		"Chart":   map[string]interface{}{"Name": meta["name"], "Version": meta["version"], "AppVersion": meta["appVersion"]},
		"Release": map[string]interface{}{"Name": "fairlead", "Namespace": namespace, "Service": "Helm"},
	}
	for _, name := range names {
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, name, data); err != nil {
			fail("%v", err)
		}
		body := strings.TrimSpace(buf.String())
		if body == "" {
			continue
		}
		fmt.Printf("---\n# Source: %s/%s\n%s\n", filepath.Base(chart), name, body)
	}
}
