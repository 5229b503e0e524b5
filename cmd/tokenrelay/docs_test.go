package main

import (
	"flag"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

// otherTools are flags the docs name that belong to other programs: the
// model servers of providers.md, docker compose, node's test runner.
var otherTools = map[string]bool{
	"--served-model-name": true, // vLLM
	"--api-key":           true, // vLLM
	"--port":              true, // llama-server
	"--build":             true, // docker compose up
	"--test":              true, // node
	"--test-concurrency":  true, // node
}

// allFlags are the flags of every command, each with its default as the
// command that uses it prints it under -h.
func allFlags(t *testing.T) map[string]*flag.Flag {
	t.Helper()
	flags := map[string]*flag.Flag{}
	for _, r := range []role{roleServe, roleGateway, roleWorker, roleMigrate} {
		fs := flag.NewFlagSet("", flag.ContinueOnError)
		new(config).register(fs, r)
		fs.VisitAll(func(f *flag.Flag) {
			if prev, ok := flags["--"+f.Name]; ok && prev.DefValue != f.DefValue {
				t.Errorf("--%s has the default %q in one command and %q in another", f.Name, prev.DefValue, f.DefValue)
			}
			flags["--"+f.Name] = f
		})
	}
	if len(flags) < 40 {
		t.Fatalf("found only %d flags", len(flags))
	}
	return flags
}

// docFiles are the documents that describe the commands: README.md and
// docs/*.md, but for benchmarks.md, which names the load tool's flags and
// records past runs.
func docFiles(t *testing.T) map[string]string {
	t.Helper()
	root := filepath.Join("..", "..")
	paths, err := filepath.Glob(filepath.Join(root, "docs", "*.md"))
	if err != nil {
		t.Fatal(err)
	}
	paths = append(paths, filepath.Join(root, "README.md"))
	docs := map[string]string{}
	for _, p := range paths {
		if filepath.Base(p) == "benchmarks.md" {
			continue
		}
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		rel, _ := filepath.Rel(root, p)
		docs[rel] = string(b)
	}
	return docs
}

var (
	flagName = regexp.MustCompile("--[a-z][a-z0-9-]*[a-z0-9](-…|-\\*)?")
	codeSpan = regexp.MustCompile("`([^`]*)`")
	envName  = regexp.MustCompile(`\bTOKENRELAY_[A-Z0-9_]*[A-Z0-9]_?`)
)

// flagRow is a row of a table whose first column names flags.
type flagRow struct {
	file, line string
	flags      []string
	def        string // the default column, "" when the table has none
	hasDef     bool
}

// flagRows returns the rows of doc's tables whose first cell names flags.
func flagRows(file, doc string) []flagRow {
	var rows []flagRow
	defCol := -1
	for _, line := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(line, "|") {
			defCol = -1
			continue
		}
		cells := strings.Split(strings.Trim(line, "|"), "|")
		for i := range cells {
			cells[i] = strings.TrimSpace(cells[i])
		}
		if strings.HasPrefix(cells[0], "flag") {
			defCol = slices.Index(cells, "default")
			continue
		}
		if !strings.HasPrefix(cells[0], "`--") {
			continue
		}
		r := flagRow{file: file, line: line}
		for _, m := range codeSpan.FindAllStringSubmatch(cells[0], -1) {
			r.flags = append(r.flags, m[1])
		}
		if defCol > 0 && defCol < len(cells) {
			r.def, r.hasDef = cells[defCol], true
		}
		rows = append(rows, r)
	}
	return rows
}

// TestDocsNameRealFlags: README.md's tables list every flag of every
// command, and no document names a flag, or a TOKENRELAY_ variable, that
// does not exist.
func TestDocsNameRealFlags(t *testing.T) {
	flags := allFlags(t)
	docs := docFiles(t)

	inReadme := map[string]bool{}
	for _, r := range flagRows("README.md", docs["README.md"]) {
		for _, f := range r.flags {
			inReadme[f] = true
		}
	}
	for name := range flags {
		if !inReadme[name] {
			t.Errorf("%s is a flag of tokenrelay, but README.md's flag tables do not list it", name)
		}
	}

	env := map[string]bool{
		// Read by the tests, not by tokenrelay.
		"TOKENRELAY_TEST_POSTGRES": true, "TOKENRELAY_CLUSTER_LOAD": true, "TOKENRELAY_BIN": true,
		"TOKENRELAY_TEST_BINARY": true,
	}
	for name := range flags {
		env["TOKENRELAY_"+strings.ToUpper(strings.ReplaceAll(strings.TrimPrefix(name, "--"), "-", "_"))] = true
	}
	for file, doc := range docs {
		for _, m := range flagName.FindAllString(doc, -1) {
			if otherTools[m] {
				continue
			}
			if prefix, ok := strings.CutSuffix(strings.TrimSuffix(m, "*"), "…"); ok || strings.HasSuffix(m, "*") {
				prefix = strings.TrimSuffix(prefix, "*")
				if !slices.ContainsFunc(keys(flags), func(f string) bool { return strings.HasPrefix(f, prefix) }) {
					t.Errorf("%s names flags %s, but no flag starts so", file, m)
				}
				continue
			}
			if flags[m] == nil {
				t.Errorf("%s names %s, which is no flag of tokenrelay", file, m)
			}
		}
		for _, m := range envName.FindAllString(doc, -1) {
			if strings.HasSuffix(m, "_") {
				if !slices.ContainsFunc(keys(env), func(e string) bool { return strings.HasPrefix(e, m) }) {
					t.Errorf("%s names variables %s…, but none starts so", file, m)
				}
				continue
			}
			if !env[m] {
				t.Errorf("%s names %s, which no flag reads", file, m)
			}
		}
	}
}

// TestDocsGiveFlagDefaults: where a document's flag table gives a default
// as a value (not in words, as "embedded"), it is the flag's.
func TestDocsGiveFlagDefaults(t *testing.T) {
	flags := allFlags(t)
	checked := 0
	for file, doc := range docFiles(t) {
		for _, r := range flagRows(file, doc) {
			if !r.hasDef {
				continue
			}
			// Several flags in a row give their defaults in order, or
			// one for all; a bare number (the limit tables) is one value.
			var defs []string
			for _, m := range codeSpan.FindAllStringSubmatch(r.def, -1) {
				defs = append(defs, m[1])
			}
			if len(defs) == 0 && regexp.MustCompile(`^[0-9.]+$`).MatchString(r.def) {
				defs = []string{r.def}
			}
			if len(defs) == 0 && r.def != "" || slices.ContainsFunc(defs, func(d string) bool { return strings.HasPrefix(d, "--") }) {
				continue // in words, such as "SQLite in `--data-dir`"
			}
			for i, name := range r.flags {
				f := flags[name]
				if f == nil {
					continue // TestDocsNameRealFlags reports it
				}
				var want string
				switch {
				case len(defs) == 0:
				case len(defs) == len(r.flags):
					want = defs[i]
				case len(defs) == 1:
					want = defs[0]
				default:
					t.Errorf("%s: %d defaults for %d flags: %s", file, len(defs), len(r.flags), r.line)
					continue
				}
				checked++
				if !sameDefault(f, want) {
					t.Errorf("%s gives %s the default %q; the flag's is %q", file, name, want, f.DefValue)
				}
			}
		}
	}
	if checked < 40 {
		t.Fatalf("checked only %d defaults; are the tables read right?", checked)
	}
}

// sameDefault reports whether doc, a default as a document writes it,
// is f's default: "" or `""` for an empty string, "24h" for 24h0m0s,
// "0" for 0s or false.
func sameDefault(f *flag.Flag, doc string) bool {
	doc = strings.Trim(doc, `"`)
	if doc == f.DefValue {
		return true
	}
	if g, ok := f.Value.(flag.Getter); ok {
		switch v := g.Get().(type) {
		case time.Duration:
			d, err := time.ParseDuration(doc)
			if doc == "0" {
				d, err = 0, nil
			}
			return err == nil && d.String() == f.DefValue
		case bool:
			return doc == "off" && !v
		}
	}
	return false
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}
