package backup

import (
	"slices"
	"testing"

	"github.com/kura-backup/kura/internal/source"
)

func TestSplitRanges(t *testing.T) {
	tests := []struct {
		name   string
		ranges []source.Extent
		size   int64
		want   []source.Extent
	}{
		{"no limit", []source.Extent{{Offset: 0, Length: 256}}, 0, []source.Extent{{Offset: 0, Length: 256}}},
		{"even", []source.Extent{{Offset: 0, Length: 256}}, 64, []source.Extent{{Offset: 0, Length: 64}, {Offset: 64, Length: 64}, {Offset: 128, Length: 64}, {Offset: 192, Length: 64}}},
		{"short tail", []source.Extent{{Offset: 100, Length: 150}}, 64, []source.Extent{{Offset: 100, Length: 64}, {Offset: 164, Length: 64}, {Offset: 228, Length: 22}}},
		{"several ranges", []source.Extent{{Offset: 0, Length: 10}, {Offset: 50, Length: 70}}, 64, []source.Extent{{Offset: 0, Length: 10}, {Offset: 50, Length: 64}, {Offset: 114, Length: 6}}},
		{"range smaller than the size", []source.Extent{{Offset: 8, Length: 8}}, 64, []source.Extent{{Offset: 8, Length: 8}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := splitRanges(tt.ranges, tt.size); !slices.Equal(got, tt.want) {
				t.Errorf("splitRanges(%v, %d) = %v, want %v", tt.ranges, tt.size, got, tt.want)
			}
		})
	}
}
