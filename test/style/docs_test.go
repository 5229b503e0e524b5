package style_test

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestDocsNameRealTestsAndMetrics: every test a document cites as
// evidence (TestXxx) exists, and so does every metric it names
// (tokenrelay_xxx), so that a rename does not leave the docs pointing at
// nothing. benchmarks.md, a record of past runs, is left out.
func TestDocsNameRealTestsAndMetrics(t *testing.T) {
	root := filepath.Join("..", "..")
	testFunc := regexp.MustCompile(`(?m)^func (Test[A-Z]\w*)\(`)
	quoted := regexp.MustCompile(`"(tokenrelay_[a-z_]+)"`)
	tests, metrics := map[string]bool{}, map[string]bool{}
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == "node_modules" || strings.HasPrefix(d.Name(), ".")) && p != root {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(p, ".go") {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasSuffix(p, "_test.go") {
			for _, m := range testFunc.FindAllStringSubmatch(string(b), -1) {
				tests[m[1]] = true
			}
			return nil
		}
		for _, m := range quoted.FindAllStringSubmatch(string(b), -1) {
			metrics[m[1]] = true
		}
		return nil
	})
	if len(tests) < 100 || len(metrics) < 20 {
		t.Fatalf("found only %d tests and %d metric names; is the walk rooted right?", len(tests), len(metrics))
	}

	docs, _ := filepath.Glob(filepath.Join(root, "docs", "*.md"))
	docs = append(docs, filepath.Join(root, "README.md"))
	testName := regexp.MustCompile(`\bTest[A-Z]\w*`)
	metricName := regexp.MustCompile(`\btokenrelay_[a-z_]*[a-z]\b`)
	for _, p := range docs {
		if filepath.Base(p) == "benchmarks.md" {
			continue
		}
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range testName.FindAllString(string(b), -1) {
			if !tests[m] {
				t.Errorf("%s cites %s, which is no test", filepath.Base(p), m)
			}
		}
		for _, m := range metricName.FindAllString(string(b), -1) {
			if !metrics[m] {
				t.Errorf("%s names the metric %s, which nothing exports", filepath.Base(p), m)
			}
		}
	}
}
