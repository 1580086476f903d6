// Renders an Ollama TEMPLATE the way Ollama does for a chat (template.Execute on .Messages): Go's text/template
// with missingkey=zero and Ollama's one extra function (json), given System (the system messages joined by a blank
// line), Messages and an empty Response. Reads {"template": "...", "conversations": [[{"role", "content"}, ...]]}
// on stdin, writes the renderings as a JSON array of strings. Used by tests/test_gguf.py.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var input struct {
		Template      string      `json:"template"`
		Conversations [][]Message `json:"conversations"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&input); err != nil {
		panic(err)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl := template.Must(template.New("").Option("missingkey=zero").Funcs(funcs).Parse(input.Template))
	out := []string{}
	for _, messages := range input.Conversations {
		var system []string
		for _, m := range messages {
			if m.Role == "system" {
				system = append(system, m.Content)
			}
		}
		var b strings.Builder
		data := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": messages, "Response": ""}
		if err := tmpl.Execute(&b, data); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
